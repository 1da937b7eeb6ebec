"""Connections a serving process keeps open, and the change-counter readers.

Split from :mod:`fedobj.catalog.engines`: the engines decide *when* a pooled
connection is used; this module holds the pools themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import asyncpg
from piccolo.engine.sqlite import dict_factory

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 10.0
"""How long closing or releasing a PostgreSQL connection may take.

Past it the connection is terminated (the socket dropped): a server that stopped
answering must not hold the caller, and the pool gets its slot back either way.
"""


async def release_postgres(
    connection: asyncpg.Connection[Any], pool: asyncpg.Pool[Any] | None
) -> None:
    """Give a connection back to ``pool`` (None: close it); never keep it.

    ``Pool.release`` rolls back a transaction left open and terminates the
    connection when that fails; a bounded timeout and a last ``terminate()`` make
    sure a server that no longer answers cannot hold us either.
    """
    try:
        if pool is not None:
            await pool.release(connection, timeout=RELEASE_TIMEOUT_S)
        else:
            await connection.close(timeout=RELEASE_TIMEOUT_S)
    except Exception as exc:
        log.warning("releasing a PostgreSQL connection failed (%s); dropping it", exc)
        with contextlib.suppress(Exception):
            connection.terminate()


SQLITE_POOL_SIZE = 4
"""Long-lived SQLite connections a serving process keeps for single statements.

A few are enough: a statement takes tens of microseconds, and in WAL mode readers
never wait for the writer. More only add idle threads."""

CHANGES_SQL = "SELECT value FROM catalog_counter WHERE name = 'changes'"
"""The catalog's change counter (bumped by triggers on ``category`` and
``model_version``; see the 2026-12-07 "change counter" migration)."""


def _run_statement(
    connection: sqlite3.Connection, query: str, args: list[Any]
) -> list[dict[str, Any]]:
    # isolation_level=None: the statement is its own transaction, committed
    # when it finishes, exactly as on Piccolo's fresh connection.
    cursor = connection.execute(query, args)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


class SQLiteStatementPool:
    """Open SQLite connections, each used by one statement at a time.

    Piccolo's SQLite engine opens a new ``aiosqlite`` connection for every
    statement outside a transaction: a new thread, the file opened and its
    schema parsed, ``PRAGMA foreign_keys`` set, then all of it torn down. Under
    the admin API's load that was most of a request's cost (profile in
    ``simulations/README.md``). The pool keeps ``size`` ``sqlite3`` connections
    and runs each statement on a worker thread of its own executor, so the event
    loop never blocks on the file.

    A connection goes back to the pool only when its statement has finished on
    the worker thread, also when the awaiting task was cancelled meanwhile.
    The executor's threads are idle between statements and end with the
    process, so a forgotten :meth:`close` cannot hang interpreter exit (an
    ``aiosqlite`` worker thread would).
    """

    def __init__(self, connection_kwargs: dict[str, Any], size: int) -> None:
        self._kwargs = connection_kwargs
        self._size = size
        self._executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="catalog-sqlite"
        )
        self._free: asyncio.Queue[sqlite3.Connection] = asyncio.Queue()
        self._all: list[sqlite3.Connection] = []
        self._inline: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        connection: sqlite3.Connection = sqlite3.connect(
            **self._kwargs, check_same_thread=False
        )
        connection.row_factory = dict_factory
        connection.execute("PRAGMA foreign_keys = 1")
        return connection

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # The inline connection never waits for a lock (timeout 0): see read_inline.
        self._inline = sqlite3.connect(**{**self._kwargs, "timeout": 0})
        self._inline.row_factory = dict_factory
        for _ in range(self._size):
            connection = await loop.run_in_executor(self._executor, self._connect)
            self._all.append(connection)
            self._free.put_nowait(connection)

    async def fetch(self, query: str, args: list[Any]) -> list[dict[str, Any]]:
        """Run one statement on a free connection; its rows as dicts."""
        connection = await self._free.get()
        loop = asyncio.get_running_loop()
        done: Future[list[dict[str, Any]]] = self._executor.submit(
            _run_statement, connection, query, args
        )
        done.add_done_callback(
            lambda _: loop.call_soon_threadsafe(self._free.put_nowait, connection)
        )
        return await asyncio.wrap_future(done)

    def read_inline(self, query: str) -> list[dict[str, Any]] | None:
        """A tiny read run in the calling (event-loop) thread; None when it
        would have to wait.

        For the change counter, read on every cached request: a thread hop
        costs ten times the read itself. In WAL mode a reader does not wait for
        writers; in the rare case it would (a WAL being reset), SQLite answers
        "busy" at once (timeout 0) and the caller takes the pooled path.
        """
        if self._inline is None:
            return None
        try:
            cursor = self._inline.execute(query)
            try:
                rows: list[dict[str, Any]] = cursor.fetchall()
            finally:
                cursor.close()
        except sqlite3.OperationalError:
            return None
        return rows

    async def close(self) -> None:
        """Wait for statements in flight, close every connection."""
        for _ in range(len(self._all)):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._free.get(), RELEASE_TIMEOUT_S)
        for connection in self._all:
            with contextlib.suppress(Exception):
                connection.close()
        self._all.clear()
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        self._executor.shutdown(wait=False, cancel_futures=True)


class CounterReader:
    """Reads the change counter on one connection, one query at a time.

    A caller arriving while a read is in flight waits for the *next* read,
    which starts as soon as the current one ends: every caller gets a value
    read after it asked (never an older one), and under load one query answers
    all the requests that arrived during the previous one.
    """

    def __init__(
        self, connect: Callable[[], Awaitable[asyncpg.Connection[Any]]]
    ) -> None:
        self._connect = connect
        self._connection: asyncpg.Connection[Any] | None = None
        self._next: asyncio.Future[int] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def read(self) -> int:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_while_asked())
        return await asyncio.shield(waiting)

    async def _read_while_asked(self) -> None:
        while self._next is not None:
            answer, self._next = self._next, None  # later callers: next read
            try:
                if self._connection is None or self._connection.is_closed():
                    self._connection = await self._connect()
                value = await self._connection.fetchval(CHANGES_SQL)
            except Exception as exc:
                await self._drop()
                answer.set_exception(exc)
                answer.exception()  # retrieved here if every caller went away
            else:
                answer.set_result(int(value or 0))

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await release_postgres(connection, None)

    async def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
        await self._drop()
