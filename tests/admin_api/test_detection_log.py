"""Detections stored in group commits: every answered request's rows are
committed before it returns, many requests share a commit, and a refused commit
fails exactly the requests it carried."""

from __future__ import annotations

import asyncio

from admin_api.detection_log import DetectionLog
from fedobj.catalog import Catalog
from tests.fedobj.catalog.conftest import (  # noqa: F401  (fixtures)
    _migrated_url,
    acatalog,
    catalog_url,
    postgres_url,
)

REFUSE = {
    "sqlite": (
        (
            "CREATE TRIGGER refuse_detection BEFORE INSERT ON detection "
            "BEGIN SELECT RAISE(ABORT, 'detections refused'); END",
        ),
        ("DROP TRIGGER refuse_detection",),
    ),
    "postgres": (
        (
            "CREATE FUNCTION refuse_detection() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'detections refused'; END $$",
            "CREATE TRIGGER refuse_detection BEFORE INSERT ON detection "
            "FOR EACH ROW EXECUTE FUNCTION refuse_detection()",
        ),
        (
            "DROP TRIGGER refuse_detection ON detection",
            "DROP FUNCTION refuse_detection()",
        ),
    ),
}


def _result(i: int) -> tuple[str, dict[str, object]]:
    return (
        f"{i:064x}",
        {
            "predictions": [{"class_index": i % 10, "confidence": 0.9}],
            "detected": True,
            "inference_time_ms": 0.5,
        },
    )


def test_concurrent_requests_share_commits_and_all_rows_land(
    acatalog: Catalog,  # noqa: F811
) -> None:
    async def main() -> tuple[int, int]:
        await acatalog.start_pool()
        log = DetectionLog(acatalog)
        log.start()
        try:
            await asyncio.gather(
                *(log.record(f"key:{i}", "v0001", [_result(i)]) for i in range(40))
            )
            return log.commits, await acatalog.count_detections()
        finally:
            await log.close()
            await acatalog.close_pool()

    commits, stored = asyncio.run(main())
    assert stored == 40
    assert 1 <= commits <= 2  # one for the first arrival, one for the rest


def test_a_refused_commit_fails_its_requests_and_the_log_goes_on(
    acatalog: Catalog,  # noqa: F811
) -> None:
    kind = "postgres" if acatalog.is_postgres else "sqlite"
    refuse, allow = REFUSE[kind]

    async def main() -> tuple[list[BaseException | None], int]:
        await acatalog.start_pool()
        log = DetectionLog(acatalog)
        log.start()
        try:
            for sql in refuse:
                await acatalog.tables.Detection.raw(sql)
            outcomes = await asyncio.gather(
                *(log.record("key:a", "v0001", [_result(i)]) for i in range(5)),
                return_exceptions=True,
            )
            for sql in allow:
                await acatalog.tables.Detection.raw(sql)
            await log.record("key:a", "v0001", [_result(9)])
            return list(outcomes), await acatalog.count_detections()
        finally:
            await log.close()
            await acatalog.close_pool()

    outcomes, stored = asyncio.run(main())
    assert all(isinstance(o, Exception) for o in outcomes)
    assert "detections refused" in str(outcomes[0])
    assert stored == 1


def test_close_writes_what_is_queued(
    acatalog: Catalog,  # noqa: F811
) -> None:
    async def main() -> int:
        log = DetectionLog(acatalog)
        log.start()
        pending = [
            asyncio.ensure_future(log.record("key:a", "v0001", [_result(i)]))
            for i in range(10)
        ]
        await asyncio.sleep(0)  # every request has queued its rows
        await log.close()
        await asyncio.gather(*pending)
        return await acatalog.count_detections()

    assert asyncio.run(main()) == 10


def test_a_bad_value_fails_only_its_own_request(
    acatalog: Catalog,  # noqa: F811
) -> None:
    async def main() -> tuple[BaseException | None, int]:
        log = DetectionLog(acatalog)
        log.start()
        try:
            good = log.record("key:a", "v0001", [_result(1)])
            wrong = log.record("key:b", "v0001", [("ff", {"predictions": object()})])
            outcomes = await asyncio.gather(good, wrong, return_exceptions=True)
            return outcomes[1], await acatalog.count_detections()
        finally:
            await log.close()

    failure, stored = asyncio.run(main())
    assert isinstance(failure, Exception)
    assert stored == 1
