"""A real ``fedobj admin serve`` on a database that refuses writes.

DESIGN.md contract 10 / issue 21: every failing write answers a 503 problem
document naming the database and the cause, the process stays up, and it keeps
nothing per failure: its thread count, its open files and (PostgreSQL) its server
connections stay flat over 100 failing writes, and the next write after the
fault is fixed succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fedobj.catalog import SyncCatalog
from tests.admin_api.conftest import make_keys
from tests.admin_api.server import Served, serve
from tests.fedobj.catalog.conftest import _empty_database
from tests.fedobj.catalog.faults import (
    DISK_FREED,
    DISK_FULL_AT_COMMIT,
    backends,
    counter_locked,
    fill,
    free,
    hold_open,
    lock_waiter,
    proc_counts,
    small_tmpfs,
    sql,
    tagged,
)

FAILING_WRITES = 100
WARM_UP = 10
"""Failures before the baseline is taken: uvicorn and anyio start their worker
threads lazily, and a leak shows as growth over the other 90, not as these."""

THREAD_SLACK = 2
FD_SLACK = 3
"""Room for a thread or socket that comes and goes with timing (a keep-alive, an
executor thread); a leak per failure would be 90 more."""


@contextmanager
def _served(outputs: Path, url: str) -> Iterator[Served]:
    """A migrated catalog at ``url``, its keys, and the server on it."""
    catalog = SyncCatalog(url)
    catalog.migrate()
    keys = make_keys(catalog, outputs / "api-secret")
    with serve(outputs, url, keys) as served:
        yield served


def _add(http: httpx.Client, served: Served, name: str) -> httpx.Response:
    return http.post(
        "/api/v1/categories", json={"name": name}, headers=served.auth("admin")
    )


def _assert_503(answer: httpx.Response, *fragments: str) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    detail = answer.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail


def _fail_many(
    http: httpx.Client, served: Served, *fragments: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Send the failing writes; (threads, fds) after the warm-up and at the end."""
    before = (0, 0)
    for i in range(FAILING_WRITES):
        if i == WARM_UP:
            before = proc_counts(served.proc.pid)
        _assert_503(_add(http, served, f"Disk full hat {i}"), *fragments)
    return before, proc_counts(served.proc.pid)


def _assert_flat(before: tuple[int, int], after: tuple[int, int]) -> None:
    assert after[0] <= before[0] + THREAD_SLACK, f"threads {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + FD_SLACK, f"open files {before[1]} -> {after[1]}"


@pytest.mark.faults
def test_full_disk_answers_503_and_keeps_nothing(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with small_tmpfs(tmp_path / "disk") as disk:
        db = disk / "catalog.db"
        with (
            _served(outputs, str(db)) as served,
            httpx.Client(base_url=served.base_url, timeout=30) as http,
        ):
            assert _add(http, served, "Before").status_code == 201
            with hold_open(db) as reader:
                fill(disk)
                before, after = _fail_many(
                    http, served, str(db), "database or disk is full", "0 B free"
                )
                _assert_flat(before, after)
                assert http.get("/health").status_code == 200
                names = reader.execute("SELECT name FROM category").fetchall()
                assert names == [("Before",)], "a failed write left a row"
                free(disk)
                made = _add(http, served, "After")
                assert made.status_code == 201, made.text
                assert made.json()["class_index"] == 1
            assert served.proc.poll() is None, "the server died"


@pytest.mark.faults
@pytest.mark.postgres
def test_postgres_failing_commits_answer_503_and_keep_the_pool(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A ``disk_full`` at COMMIT 100 times (ten times the pool), then backends
    killed mid-transaction: the pool keeps its size and serves the next write."""
    with _empty_database("postgres", request) as plain:
        url = tagged(plain)
        with (
            _served(tmp_path, url) as served,
            httpx.Client(base_url=served.base_url, timeout=30) as http,
        ):
            assert _add(http, served, "Before").status_code == 201
            pool = len(asyncio.run(backends(url)))
            asyncio.run(sql(url, DISK_FULL_AT_COMMIT))
            before, after = _fail_many(
                http, served, "(postgres)", "No space left on device"
            )
            _assert_flat(before, after)
            assert len(asyncio.run(backends(url))) <= pool
            asyncio.run(sql(url, DISK_FREED))
            assert _add(http, served, "After disk").status_code == 201
            for i in range(12):  # more than the pool's ten connections
                _assert_503(asyncio.run(_killed_write(served, url, i)))
            assert _add(http, served, "After kills").status_code == 201
            assert len(asyncio.run(backends(url))) <= pool
            assert served.proc.poll() is None, "the server died"


async def _killed_write(served: Served, url: str, i: int) -> httpx.Response:
    """A write whose server connection is terminated while it waits on a lock."""
    async with (
        httpx.AsyncClient(base_url=served.base_url, timeout=30) as http,
        counter_locked(url),
    ):
        write = asyncio.create_task(
            http.post(
                "/api/v1/categories",
                json={"name": f"Cut {i}"},
                headers=served.auth("admin"),
            )
        )
        pid = await lock_waiter(url)
        await sql(url, f"SELECT pg_terminate_backend({pid})")
        return await asyncio.wait_for(write, 20)
