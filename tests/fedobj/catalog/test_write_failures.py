"""A write the database refuses rolls back, closes what it opened and says why.

DESIGN.md contract 10 / issue 21 item 2: a commit that met a full disk used to
leave its aiosqlite connection (and that connection's non-daemon thread) open, so
``fedobj catalog add`` printed the error and never exited. These tests fail the
write for real (a full tmpfs, a held lock, a PostgreSQL ``disk_full`` raised at
COMMIT, a backend killed mid-transaction) and check that nothing stays open.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import asyncpg
import pytest

from fedobj.adminproc import FEDOBJ
from fedobj.catalog import (
    Catalog,
    DatabaseUnavailableError,
    DatabaseWriteError,
    SyncCatalog,
    migrate,
)
from fedobj.catalog import db as catalog_db
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
    small_tmpfs,
    sql,
    sqlite_workers,
    tagged,
)

CLI_TIMEOUT_S = 20
"""The CLI must be done well inside this; the issue asks for 10 s."""


@pytest.fixture
def disk_db(tmp_path: Path) -> Iterator[Path]:
    """A migrated SQLite catalog on a 2 MiB tmpfs of its own (not yet full)."""
    with small_tmpfs(tmp_path / "disk") as disk:
        db = disk / "catalog.db"
        migrate(db)
        yield db


# ---------------------------------------------------------------- SQLite, full disk


@pytest.mark.faults
def test_commit_on_full_disk_rolls_back_closes_and_names_the_disk(
    disk_db: Path,
) -> None:
    catalog = SyncCatalog(disk_db)
    catalog.add_category("Before")
    with hold_open(disk_db):
        fill(disk_db.parent)
        for i in range(20):
            with pytest.raises(DatabaseWriteError) as err:
                catalog.add_category(f"Disk full hat {i}")
            message = str(err.value)
            assert message.startswith(f"cannot write to catalog database {disk_db} ")
            assert "database or disk is full" in message
            assert f"0 B free in {disk_db.parent}" in message
            assert "\n" not in message
            assert sqlite_workers() == [], "a failed write left its connection open"
        assert [c.name for c in catalog.list_categories()] == ["Before"]
        free(disk_db.parent)
        after = catalog.add_category("After")
    assert after.class_index == 1, "a rolled-back write must not use up an index"


@pytest.mark.faults
def test_failed_write_does_not_leave_its_transaction_current(disk_db: Path) -> None:
    """One task, as the admin API runs a request: after the failed write the
    next query must get a connection of its own, not the dead transaction's."""

    async def scenario() -> list[str]:
        catalog = Catalog(disk_db)
        for i in range(5):
            with pytest.raises(DatabaseWriteError):
                await catalog.add_category(f"Disk full hat {i}")
        return [c.name for c in await catalog.list_categories()]

    with hold_open(disk_db):
        fill(disk_db.parent)
        assert asyncio.run(scenario()) == []
        assert sqlite_workers() == []


@pytest.mark.faults
@pytest.mark.parametrize(
    ("held_open", "cause"),
    [(True, "database or disk is full"), (False, "disk I/O error")],
    ids=["commit-fails", "open-fails"],
)
def test_cli_write_on_full_disk_exits_with_one_line(
    disk_db: Path, tmp_path: Path, held_open: bool, cause: str
) -> None:
    """The issue's command, as a user runs it. With another process holding the
    database open (a run, the API) the COMMIT is what fails; alone, opening it
    does (SQLite cannot create its ``-shm`` file)."""
    env = {**os.environ, "FEDOBJ_OUTPUTS_DIR": str(tmp_path / "outputs")}
    cmd = [FEDOBJ, "catalog", "add", "Disk full hat", "--db", str(disk_db)]
    with ExitStack() as stack:
        if held_open:
            stack.enter_context(hold_open(disk_db))
        fill(disk_db.parent)
        started = time.monotonic()
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`fedobj catalog add` still running after {exc.timeout} s")
        took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert took < 10, f"took {took:.1f} s"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot write to catalog database {disk_db} ")
    assert cause in lines[0]
    assert done.stdout == ""


# ---------------------------------------------------------------- SQLite, locked


def test_begin_that_outwaits_the_lock_closes_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BEGIN IMMEDIATE`` failing ("database is locked") used to leak too."""
    monkeypatch.setattr(catalog_db, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "catalog.db"
    migrate(db)
    catalog = SyncCatalog(db)
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        for _ in range(3):
            with pytest.raises(DatabaseUnavailableError, match="database is locked"):
                catalog.add_category("Blocked")
            assert sqlite_workers() == []
        other.execute("ROLLBACK")
    assert catalog.add_category("Unblocked").class_index == 0


# ---------------------------------------------------------------- the mapping


def _sqlite_error(text: str, code: int) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code  # what the driver sets on a real one
    return exc


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (_sqlite_error("database or disk is full", sqlite3.SQLITE_FULL), "is full"),
        (_sqlite_error("disk I/O error", 4874), "disk I/O error"),  # IOERR_SHMSIZE
        (
            _sqlite_error("attempt to write a readonly database", 8),
            "readonly database",
        ),
        (sqlite3.OperationalError("database or disk is full"), "is full"),  # no code
        (OSError(errno.ENOSPC, "No space left on device"), "No space left"),
        (asyncpg.exceptions.DiskFullError("could not extend file"), "extend file"),
        (asyncpg.exceptions.OutOfMemoryError("out of memory"), "out of memory"),
        (
            asyncpg.exceptions.ReadOnlySQLTransactionError(
                "cannot execute INSERT in a read-only transaction"
            ),
            "read-only",
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_storage_refusals_are_write_errors_naming_the_database(
    tmp_path: Path, exc: BaseException, fragment: str
) -> None:
    spec = catalog_db.resolve_url(tmp_path / "catalog.db")
    mapped = catalog_db.unavailable_error(exc, spec)
    assert isinstance(mapped, DatabaseWriteError)
    message = str(mapped)
    assert message.startswith(f"cannot write to catalog database {spec.display} ")
    assert fragment in message
    assert f"free in {tmp_path}" in message


def test_connection_failures_stay_unavailable_not_write_errors() -> None:
    spec = catalog_db.resolve_url("postgresql://u:secret@127.0.0.1:1/db")
    for exc in (
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        ConnectionRefusedError(111, "Connection refused"),
    ):
        mapped = catalog_db.unavailable_error(exc, spec)
        assert type(mapped) is DatabaseUnavailableError, exc
        assert "secret" not in str(mapped)


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated PostgreSQL catalog whose connections carry a unique tag."""
    with _empty_database("postgres", request) as url:
        url = tagged(url)
        migrate(url)
        yield url


@pytest.mark.faults
@pytest.mark.postgres
def test_postgres_commit_that_fails_returns_its_connection(pg_url: str) -> None:
    """Ten such failures used to empty the admin API's pool for good."""

    async def scenario() -> None:
        await sql(pg_url, DISK_FULL_AT_COMMIT)
        catalog = Catalog(pg_url)
        await catalog.start_pool(min_size=1, max_size=2)
        try:
            for i in range(6):  # three times the pool
                with pytest.raises(DatabaseWriteError) as err:
                    await asyncio.wait_for(catalog.add_category(f"Hat {i}"), 10)
                message = str(err.value)
                assert message.startswith("cannot write to catalog database ")
                assert "(postgres): could not extend file" in message
                assert "No space left on device" in message
                assert "\n" not in message
            assert len(await backends(pg_url)) <= 2
            await sql(pg_url, DISK_FREED)
            after = await asyncio.wait_for(catalog.add_category("After"), 10)
            assert after.class_index == 0
        finally:
            await catalog.close_pool()

    asyncio.run(scenario())


@pytest.mark.faults
@pytest.mark.postgres
def test_postgres_failed_commit_without_pool_closes_its_connection(
    pg_url: str,
) -> None:
    """The CLI and the strategy connect per call: each failure must hang up."""
    asyncio.run(sql(pg_url, DISK_FULL_AT_COMMIT))
    catalog = SyncCatalog(pg_url)
    for i in range(5):
        with pytest.raises(DatabaseWriteError):
            catalog.add_category(f"Hat {i}")
    deadline = time.monotonic() + 5  # the server reaps a closed backend shortly
    while asyncio.run(backends(pg_url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert asyncio.run(backends(pg_url)) == []


@pytest.mark.faults
@pytest.mark.postgres
def test_postgres_backend_killed_mid_transaction(pg_url: str) -> None:
    """``pg_terminate_backend`` while a write waits on a lock: the write fails as
    "unavailable", and the pool still serves the next write."""

    async def scenario() -> None:
        catalog = Catalog(pg_url)
        await catalog.start_pool(min_size=1, max_size=2)
        try:
            for i in range(4):  # twice the pool
                async with counter_locked(pg_url):
                    write = asyncio.create_task(catalog.add_category(f"Cut {i}"))
                    pid = await lock_waiter(pg_url)
                    await sql(pg_url, f"SELECT pg_terminate_backend({pid})")
                    with pytest.raises(DatabaseUnavailableError):
                        await asyncio.wait_for(write, 10)
            after = await asyncio.wait_for(catalog.add_category("After"), 10)
            assert after.class_index == 0
        finally:
            await catalog.close_pool()

    asyncio.run(scenario())
