"""Real faults for the write-failure tests: a full disk on either database.

SQLite: a small tmpfs the test mounts and fills. PostgreSQL: the server's own
``disk_full`` error raised at COMMIT (see :data:`DISK_FULL_AT_COMMIT`), and its
backends found by a per-test ``application_name``.

Mounting needs root (CI and the dev container run the suite as root). Where it is
not permitted the tests skip, except under ``CI=true``, where they fail: a CI run
must not pass without having filled a disk (the same rule as the PostgreSQL cases
in ``conftest.py``).

A SQLite database in WAL mode writes to its ``-wal`` file, and that file is
deleted when the last connection closes. :func:`hold_open` keeps a connection
open, as the ServerApp or the admin API would, so the catalog's next ``COMMIT``
is the statement that meets the full disk (SQLite's "database or disk is full");
without it, opening the database fails first ("disk I/O error" creating the
``-shm`` file).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path

import asyncpg
import pytest

FILLER = "filler"


@contextmanager
def small_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``folder`` for the block; always unmounted."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        problem = ""
        if proc.returncode:
            problem = proc.stderr.strip() or f"mount exited {proc.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem:
        message = f"cannot mount a tmpfs for the full-disk tests: {problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: run the faults tests as root)")
        pytest.skip(message)
    try:
        yield folder
    finally:
        done = subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)
        if done.returncode:  # something still holds a file there: detach anyway
            subprocess.run(["umount", "-l", str(folder)], check=True, timeout=30)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem answers ENOSPC."""
    path = folder / FILLER
    chunk = bytes(4096)
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    assert shutil.disk_usage(folder).free == 0, "the filesystem still has room"
    return path


def free(folder: Path) -> None:
    """Give the space back (the filler goes)."""
    (folder / FILLER).unlink()


@contextmanager
def hold_open(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Keep a reader connection open, with the WAL checkpointed and emptied.

    An empty ``-wal`` file means the next commit must grow it, so on a full disk
    that commit fails instead of reusing space the WAL already had.
    """
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.execute("SELECT count(*) FROM category").fetchall()
        yield conn


def sqlite_workers(grace_s: float = 2.0) -> list[threading.Thread]:
    """aiosqlite's per-connection worker threads still alive after ``grace_s``.

    They are not daemons: one left behind keeps the interpreter from exiting.
    ``Connection.close()`` returns as soon as the worker has taken its stop
    order, a moment before the thread ends, hence the join.
    """
    workers = [t for t in threading.enumerate() if "_connection_worker" in t.name]
    for t in workers:
        t.join(timeout=grace_s)
    return [t for t in workers if t.is_alive()]


def proc_counts(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of process ``pid``, from /proc."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------- PostgreSQL

DISK_FULL_AT_COMMIT = """
CREATE FUNCTION fedobj_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not extend file "base/16384/2619": No space left on device'
    USING ERRCODE = 'disk_full', HINT = 'Check free disk space.';
END $$;
CREATE CONSTRAINT TRIGGER disk_full AFTER INSERT ON category
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fedobj_disk_full();
"""
"""A PostgreSQL disk that fills at COMMIT, where Piccolo's clean-up was skipped.

A deferred constraint trigger runs when the transaction commits; SQLSTATE 53100
is what the server sends when it cannot extend a file. Nobody fills the real
server's disk, which other tests share.
"""

DISK_FREED = "DROP TRIGGER disk_full ON category"

_TAG = "&application_name="


def tagged(url: str) -> str:
    """``url`` with a unique ``application_name``: ``pg_stat_activity`` then
    shows exactly the backends the catalog (or the server under test) holds."""
    return f"{url}{_TAG}fedobj_{uuid.uuid4().hex[:10]}"


def _untagged(url: str) -> str:
    return url.split(_TAG)[0]


async def sql(url: str, statements: str) -> None:
    """Run ``statements`` on a connection of the test's own (never the pool's)."""
    conn = await asyncpg.connect(_untagged(url), timeout=5)
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


async def query(url: str, statement: str) -> list[asyncpg.Record]:
    """Rows of ``statement``, on a connection of the test's own."""
    conn = await asyncpg.connect(_untagged(url), timeout=5)
    try:
        return list(await conn.fetch(statement))
    finally:
        await conn.close()


async def backends(url: str, where: str = "true") -> list[asyncpg.Record]:
    """Server backends opened with ``url``'s tag (the test's own are untagged)."""
    name = url.rsplit(_TAG, 1)[1]
    return await query(
        url,
        "SELECT pid, state, wait_event_type FROM pg_stat_activity "
        f"WHERE application_name = '{name}' AND {where}",
    )


async def lock_waiter(url: str, timeout_s: float = 10) -> int:
    """The pid of a tagged backend waiting on a lock, once there is one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = await backends(url, "wait_event_type = 'Lock'")
        if rows:
            return int(rows[0]["pid"])
        await asyncio.sleep(0.05)
    raise AssertionError("no write waited on the lock")


@asynccontextmanager
async def counter_locked(url: str) -> AsyncIterator[None]:
    """Hold ``catalog_counter`` locked: every catalog write waits inside its
    transaction (``_next_number``) until the block ends."""
    conn = await asyncpg.connect(_untagged(url), timeout=5)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE catalog_counter IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()
