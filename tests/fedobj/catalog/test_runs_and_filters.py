"""Run rows (begin, end, resume, list), per-node training time and DP spend, and
the detection history's filters — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from fedobj.catalog import (
    Catalog,
    CatalogValueError,
    DetectionFilter,
    NotFoundError,
    SyncCatalog,
)
from tests.fedobj.catalog.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked(catalog_url: str, clock: FakeClock) -> Catalog:
    """The async catalog on a clock the test moves by hand."""
    return Catalog(catalog_url, clock=clock)


# ---------------------------------------------------------------- runs


def test_a_run_begins_and_ends(clocked: Catalog, clock: FakeClock) -> None:
    async def main() -> None:
        began = await clocked.begin_run(
            "run-a",
            strategy="fedavg",
            model="cnn",
            first_round=1,
            last_round=20,
            config={"num-server-rounds": 20, "dp": False, "lr": 0.05},
        )
        assert (began.run_id, began.status, began.strategy, began.model) == (
            "run-a",
            "running",
            "fedavg",
            "cnn",
        )
        assert (began.first_round, began.last_round) == (1, 20)
        assert began.config == {"num-server-rounds": 20, "dp": False, "lr": 0.05}
        assert (began.error, began.finished_at) == (None, None)
        assert began.started_at == clock.now
        assert await clocked.get_run("run-a") == began

        clock.advance(90)
        ended = await clocked.end_run("run-a", "completed")
        assert (ended.status, ended.error) == ("completed", None)
        assert ended.finished_at == clock.now
        assert ended.started_at == began.started_at

    asyncio.run(main())


def test_a_failed_run_keeps_its_error(clocked: Catalog) -> None:
    async def main() -> None:
        await clocked.begin_run(
            "run-b", strategy="fedprox", model="cnn", first_round=1, last_round=3
        )
        failed = await clocked.end_run("run-b", "failed", "round 2: no node replied")
        assert (failed.status, failed.error) == ("failed", "round 2: no node replied")
        assert failed.config == {}

    asyncio.run(main())


def test_an_invalid_run_status_is_refused_and_changes_nothing(
    clocked: Catalog,
) -> None:
    async def main() -> None:
        began = await clocked.begin_run(
            "run-c", strategy="fedavg", model="cnn", first_round=1, last_round=3
        )
        for status in ("exploded", "Completed", "in_progress", ""):
            with pytest.raises(CatalogValueError, match="run status"):
                await clocked.end_run("run-c", status)
        assert await clocked.get_run("run-c") == began

    asyncio.run(main())


def test_an_unknown_run_is_not_found(clocked: Catalog) -> None:
    async def main() -> None:
        with pytest.raises(NotFoundError):
            await clocked.get_run("no-such-run")
        with pytest.raises(NotFoundError):
            await clocked.end_run("no-such-run", "completed")
        assert await clocked.list_run_records() == []

    asyncio.run(main())


def test_a_resumed_run_id_is_reset(clocked: Catalog, clock: FakeClock) -> None:
    async def main() -> None:
        await clocked.begin_run(
            "run-d",
            strategy="fedavg",
            model="cnn",
            first_round=1,
            last_round=10,
            config={"lr": 0.1, "dp": True},
        )
        clock.advance(60)
        await clocked.end_run("run-d", "failed", "killed")
        clock.advance(60)
        resumed = await clocked.begin_run(
            "run-d",
            strategy="fedprox",
            model="resnet",
            first_round=4,
            last_round=12,
            config={"lr": 0.05},
        )
        assert (resumed.status, resumed.error, resumed.finished_at) == (
            "running",
            None,
            None,
        )
        assert (resumed.strategy, resumed.model) == ("fedprox", "resnet")
        assert (resumed.first_round, resumed.last_round) == (4, 12)
        assert resumed.config == {"lr": 0.05}  # replaced, not merged
        assert resumed.started_at == clock.now
        assert len(await clocked.list_run_records()) == 1

    asyncio.run(main())


def test_run_config_is_stored_as_plain_json(clocked: Catalog) -> None:
    async def main() -> None:
        began = await clocked.begin_run(
            "run-e",
            strategy="fedavg",
            model="cnn",
            first_round=1,
            last_round=1,
            config={"mu": float("nan"), "nested": {"rounds": [1, 2]}},
        )
        assert began.config == {"mu": None, "nested": {"rounds": [1, 2]}}
        with pytest.raises(CatalogValueError, match="run config"):
            await clocked.begin_run(
                "run-f",
                strategy="fedavg",
                model="cnn",
                first_round=1,
                last_round=1,
                config={"when": object()},
            )
        with pytest.raises(NotFoundError):
            await clocked.get_run("run-f")

    asyncio.run(main())


def test_run_records_are_listed_most_recent_first(
    clocked: Catalog, clock: FakeClock
) -> None:
    async def main() -> None:
        for run_id in ("first", "second", "third"):
            await clocked.begin_run(
                run_id, strategy="fedavg", model="cnn", first_round=1, last_round=2
            )
            clock.advance(10)
        assert [r.run_id for r in await clocked.list_run_records()] == [
            "third",
            "second",
            "first",
        ]
        assert [r.run_id for r in await clocked.list_run_records(limit=2)] == [
            "third",
            "second",
        ]
        clock.advance(10)
        await clocked.begin_run(  # resumed: started again, so listed first
            "first", strategy="fedavg", model="cnn", first_round=2, last_round=2
        )
        newest = await clocked.list_run_records(limit=1)
        assert [(r.run_id, r.first_round) for r in newest] == [("first", 2)]

    asyncio.run(main())


# ---------------------------------------------------------------- node rounds


def test_node_rounds_keep_training_time_and_dp_spend(catalog: SyncCatalog) -> None:
    catalog.record_node_round(
        "r",
        1,
        7,
        "train",
        num_examples=50,
        loss=0.5,
        train_seconds=3.25,
        dp_epsilon=0.75,
    )
    catalog.record_node_round("r", 1, 8, "train", num_examples=40)
    catalog.record_node_round(
        "r", 1, 9, "train", train_seconds=float("nan"), dp_epsilon=float("inf")
    )
    catalog.record_node_round("r", 1, 7, "evaluate", num_examples=10, accuracy=0.9)
    got = [
        (n.node_id, n.kind, n.train_seconds, n.dp_epsilon)
        for n in catalog.node_rounds("r", 1)
    ]
    assert got == [
        ("7", "train", 3.25, 0.75),
        ("8", "train", None, None),
        ("9", "train", None, None),  # not finite: stored as unknown
        ("7", "evaluate", None, None),
    ]


# ---------------------------------------------------------------- detections


def _det(index: int | None, confidence: float = 0.9) -> dict[str, Any]:
    preds = (
        []
        if index is None
        else [
            {"class_index": index, "object_name": f"c{index}", "confidence": confidence}
        ]
    )
    detected = bool(preds) and confidence >= 0.7
    return {"predictions": preds, "detected": detected, "inference_time_ms": 2.5}


def test_detections_filter_by_class_version_and_time(
    clocked: Catalog, clock: FakeClock
) -> None:
    start = clock.now

    async def main() -> None:
        # day 0: two on v0001 (classes 3 and 5); day 1: class 3 on v0002 and one
        # with no prediction at all; day 2: class 3 on v0001
        await clocked.record_detections(
            "key:a", "v0001", [("a" * 64, _det(3)), ("b" * 64, _det(5, 0.4))]
        )
        clock.advance(86400)
        await clocked.record_detections(
            "key:b", "v0002", [("c" * 64, _det(3)), ("d" * 64, _det(None))]
        )
        clock.advance(86400)
        await clocked.record_detections("key:a", "v0001", [("e" * 64, _det(3))])

        async def shas(where: DetectionFilter | None, **kw: Any) -> list[str]:
            rows = await clocked.list_detections(where=where, **kw)
            assert await clocked.count_detections(where) == len(
                await clocked.list_detections(where=where, limit=1000)
            )
            return [r.image_sha256[0] for r in rows]

        assert await shas(None) == ["e", "d", "c", "b", "a"]  # newest first
        assert await shas(DetectionFilter()) == ["e", "d", "c", "b", "a"]
        assert await shas(DetectionFilter(class_index=3)) == ["e", "c", "a"]
        assert await shas(DetectionFilter(class_index=5)) == ["b"]
        assert await shas(DetectionFilter(class_index=0)) == []  # 0 is a class
        assert await shas(DetectionFilter(model_version="v0002")) == ["d", "c"]
        assert await shas(DetectionFilter(model_version="v0009")) == []
        day1 = start + timedelta(days=1)
        assert await shas(DetectionFilter(since=day1)) == ["e", "d", "c"]
        assert await shas(DetectionFilter(until=day1)) == ["b", "a"]  # exclusive
        assert await shas(
            DetectionFilter(since=day1, until=day1 + timedelta(days=1))
        ) == ["d", "c"]
        assert await shas(
            DetectionFilter(class_index=3, model_version="v0001", since=day1)
        ) == ["e"]
        assert await shas(DetectionFilter(class_index=3), limit=2) == ["e", "c"]
        assert await shas(DetectionFilter(class_index=3), limit=2, offset=2) == ["a"]
        assert await clocked.count_detections() == 5
        assert await clocked.count_detections(DetectionFilter(class_index=3)) == 3

        [none] = await clocked.list_detections(
            where=DetectionFilter(model_version="v0002", class_index=None), limit=1
        )
        assert (none.top_class_index, none.top_confidence, none.detected) == (
            None,
            None,
            False,
        )
        [b] = await clocked.list_detections(where=DetectionFilter(class_index=5))
        assert (b.actor, b.model_version, b.detected) == ("key:a", "v0001", False)
        assert (b.top_confidence, b.inference_time_ms) == (0.4, 2.5)
        assert b.predictions == _det(5, 0.4)["predictions"]
        assert b.at == start

    asyncio.run(main())
