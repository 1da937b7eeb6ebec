"""Piccolo engines whose transactions always close what they open.

Piccolo 1.38's ``SQLiteTransaction.__aexit__`` (and ``PostgresTransaction``'s)
runs ``COMMIT`` or ``ROLLBACK`` and only then closes the connection, with no
``finally``; its ``__aenter__`` likewise leaves the connection open when
``BEGIN`` fails. So when ``COMMIT`` failed (SQLite's "database or disk is full",
a dropped PostgreSQL connection) or ``BEGIN IMMEDIATE`` outwaited the busy
timeout, the connection stayed open and the transaction stayed current in the
engine's context variable:

- SQLite: every aiosqlite connection owns a worker thread that is *not* a daemon.
  The CLI printed the error and then never exited (``threading._shutdown`` waited
  for a worker blocked in ``tx.get()``); the admin API kept a thread and the
  database's file descriptors per failure until the garbage collector happened by.
- PostgreSQL: a pooled connection was never released, so ten such failures
  emptied the admin API's pool and every later request waited in ``acquire()``.

The subclasses below keep Piccolo's behaviour and add what DESIGN.md contract 10
asks for: a failed ``BEGIN`` or ``COMMIT`` is rolled back where the database still
allows it, and the connection is closed (or returned to its pool) on every path,
cancellation included. The caller sees the original error, never a clean-up one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

import aiosqlite
import asyncpg
from piccolo.engine.postgres import PostgresEngine, PostgresTransaction
from piccolo.engine.sqlite import (
    SQLiteEngine,
    SQLiteTransaction,
    TransactionType,
    dict_factory,
)

from fedobj.catalog.pools import (
    CHANGES_SQL,
    SQLITE_POOL_SIZE,
    CounterReader,
    SQLiteStatementPool,
    release_postgres,
)

log = logging.getLogger(__name__)


async def _quietly(step: Awaitable[object], what: str) -> None:
    """Await a clean-up step whose failure must not replace the error in flight.

    After a failed ``COMMIT`` SQLite may already have rolled back, so ``ROLLBACK``
    answers "no transaction is active"; that is expected, not news.
    """
    try:
        await step
    except Exception as exc:
        log.debug("%s failed: %s", what, exc)


async def _finish(
    tx: SQLiteTransaction | PostgresTransaction, exc: BaseException | None
) -> None:
    """Commit on success, roll back on failure: Piccolo's rules, made total."""
    if exc is not None:
        if not tx._rolled_back:
            await _quietly(tx.rollback(), "ROLLBACK")
        return
    if tx._committed or tx._rolled_back:
        return
    try:
        await tx.commit()
    except BaseException:
        await _quietly(tx.rollback(), "ROLLBACK after a failed COMMIT")
        raise


def _in_transaction(connection: aiosqlite.Connection) -> bool:
    try:
        return bool(connection.in_transaction)
    except ValueError:  # already closed
        return True


async def _close_sqlite(connection: aiosqlite.Connection) -> None:
    """Close the connection; its worker thread ends even when ``close`` fails.

    ``aiosqlite.Connection.close`` stops the worker in a ``finally`` of its own,
    so a failure here is only logged.
    """
    try:
        await connection.close()
    except Exception as exc:
        log.warning("closing a SQLite connection failed: %s", exc)


async def _release_sqlite(
    engine: SQLiteEngine, connection: aiosqlite.Connection
) -> None:
    if isinstance(engine, CatalogSQLiteEngine):
        await engine.release_connection(connection)
    else:  # pragma: no cover - the catalog builds only CatalogSQLiteEngine
        await _close_sqlite(connection)


class ClosingSQLiteTransaction(SQLiteTransaction):
    """A :class:`SQLiteTransaction` that closes its connection on every path.

    In a serving process (pool open) write transactions of the process queue on
    an asyncio lock before ``BEGIN IMMEDIATE``: SQLite admits one writer, and
    writers that met on the file lock instead slept in SQLite's busy handler
    (backing off up to 100 ms a try), which under load turned a 3 ms write into
    hundreds of milliseconds. Other processes still meet on the file lock.
    """

    _holds: asyncio.Lock | None = None

    async def __aenter__(self) -> SQLiteTransaction:
        if self._parent is not None:
            return self._parent
        lock = _write_lock(self.engine, self.transaction_type)
        if lock is not None:
            await lock.acquire()
            self._holds = lock
        try:
            self.connection = await self.get_connection()
            try:
                await self.begin()
            except BaseException:
                await _release_sqlite(self.engine, self.connection)
                raise
        except BaseException:
            self._unlock()
            raise
        self.context = self.engine.current_transaction.set(self)
        return self

    def _unlock(self) -> None:
        held, self._holds = self._holds, None
        if held is not None:
            held.release()

    async def __aexit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self._parent is not None:
            return exception is None
        try:
            await _finish(self, exception)
        finally:
            self.engine.current_transaction.reset(self.context)
            try:
                await _release_sqlite(self.engine, self.connection)
            finally:
                self._unlock()
        return exception is None


def _write_lock(
    engine: SQLiteEngine, transaction_type: TransactionType
) -> asyncio.Lock | None:
    if transaction_type is not TransactionType.immediate:
        return None
    if isinstance(engine, CatalogSQLiteEngine) and engine.pool is not None:
        return engine.write_lock
    return None


class ClosingPostgresTransaction(PostgresTransaction):
    """A :class:`PostgresTransaction` that releases its connection on every path."""

    async def __aenter__(self) -> PostgresTransaction:
        if self._parent is not None:
            return self._parent
        self.connection = await self.get_connection()
        try:
            self.transaction = self.connection.transaction()
            await self.begin()
        except BaseException:
            await release_postgres(self.connection, self.engine.pool)
            raise
        self.context = self.engine.current_transaction.set(self)
        return self

    async def __aexit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self._parent is not None:
            return exception is None
        try:
            await _finish(self, exception)
        finally:
            self.engine.current_transaction.reset(self.context)
            await release_postgres(self.connection, self.engine.pool)
        return exception is None


TX_CONNECTIONS_KEPT = 2
"""Transaction connections a serving process keeps open. SQLite has one writer
at a time, so two cover a commit and the next one queueing behind it; a
transaction finding none free opens a connection of its own, as Piccolo does."""


class CatalogSQLiteEngine(SQLiteEngine):
    """SQLite engine with closing transactions, no start-up version probe, and
    (in a serving process) a pool of open connections for single statements."""

    pool: SQLiteStatementPool | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: set[aiosqlite.Connection] = set()
        self._kept_free: list[aiosqlite.Connection] = []
        self.write_lock = asyncio.Lock()

    async def start_pool(self, size: int = SQLITE_POOL_SIZE) -> None:
        """Keep ``size`` connections open for statements outside transactions.

        Only for a long-lived event loop (the admin API): the pool belongs to
        the loop that opened it. Transactions still open their own connection.
        """
        if self.pool is None:
            pool = SQLiteStatementPool(self.connection_kwargs, size)
            await pool.open()
            self.pool = pool

    async def close_pool(self) -> None:
        """Close the statement pool and the kept transaction connections (one
        still in use is closed when its transaction ends)."""
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()
        while self._kept_free:
            connection = self._kept_free.pop()
            self._kept.discard(connection)
            await _close_sqlite(connection)

    async def _run_in_new_connection(
        self,
        query: str,
        args: list[Any] | None = None,
        query_type: str = "generic",
        table: Any = None,
    ) -> Any:
        """A pooled connection when the pool is open; else Piccolo's fresh one."""
        if self.pool is None:
            return await super()._run_in_new_connection(query, args, query_type, table)
        return await self.pool.fetch(query, list(args or []))

    async def change_count(self) -> int:
        """The catalog's change counter (see :data:`CHANGES_SQL`)."""
        if self.pool is not None:
            rows = self.pool.read_inline(CHANGES_SQL)
            if rows is None:
                rows = await self.pool.fetch(CHANGES_SQL, [])
        else:
            rows = await super()._run_in_new_connection(CHANGES_SQL)
        return int(rows[0]["value"]) if rows else 0

    async def check_version(self) -> None:
        """Skip Piccolo's probe: it only warns, and the catalog checks in ``ping``."""

    def transaction(
        self,
        transaction_type: TransactionType = TransactionType.deferred,
        allow_nested: bool = True,
    ) -> SQLiteTransaction:
        """Like Piccolo's, but the transaction closes what it opened."""
        return ClosingSQLiteTransaction(
            engine=self, transaction_type=transaction_type, allow_nested=allow_nested
        )

    async def get_connection(self) -> aiosqlite.Connection:
        """A connection for a transaction: a kept one when the pool is open and
        one is free, else a new one (never waits: no transaction can starve
        another of connections)."""
        if self.pool is not None and self._kept_free:
            return self._kept_free.pop()
        connection = await self._connect(daemon=self.pool is not None)
        if self.pool is not None and len(self._kept) < TX_CONNECTIONS_KEPT:
            self._kept.add(connection)
        return connection

    async def release_connection(self, connection: aiosqlite.Connection) -> None:
        """Keep a pooled connection whose transaction ended cleanly; close any
        other (a connection left inside a transaction is never reused)."""
        if connection in self._kept:
            if self.pool is not None and not _in_transaction(connection):
                self._kept_free.append(connection)
                return
            self._kept.discard(connection)
        await _close_sqlite(connection)

    async def _connect(self, *, daemon: bool) -> aiosqlite.Connection:
        """Piccolo's connection set-up, closed again if the set-up fails.

        ``daemon``: a kept connection's worker thread must not keep the
        interpreter alive if nobody closes it (aiosqlite starts it non-daemon;
        the thread object exists before the connection is awaited).
        """
        pending = aiosqlite.connect(**self.connection_kwargs)
        pending._thread.daemon = daemon
        connection = await pending
        try:
            # aiosqlite types row_factory as a class; sqlite3 takes any callable
            connection.row_factory = dict_factory  # type: ignore[assignment]
            await connection.execute("PRAGMA foreign_keys = 1")
        except BaseException:
            await _close_sqlite(connection)
            raise
        return connection


class CatalogPostgresEngine(PostgresEngine):
    """asyncpg engine that connects lazily and always gives connections back.

    Piccolo's ``Engine.__init__`` connects to read the server version and merely
    prints a warning when that fails; construction should be free and the first
    real query should raise :class:`DatabaseUnavailableError` instead.
    """

    async def check_version(self) -> None:
        """Skip the probe (see the class docstring)."""

    async def prep_database(self) -> None:
        """No extensions needed: ``gen_random_uuid()`` is built in since PG 13."""

    _counter: CounterReader | None = None

    async def change_count(self) -> int:
        """The catalog's change counter (see :data:`CHANGES_SQL`).

        With the pool open, on a connection of its own (:class:`CounterReader`):
        a pooled read paid a second round trip for the pool's reset on release.
        """
        if self.pool is not None:
            if self._counter is None:
                self._counter = CounterReader(self.get_new_connection)
            return await self._counter.read()
        rows = await self._run_in_new_connection(CHANGES_SQL)
        return int(rows[0]["value"]) if rows else 0

    async def close_connection_pool(self) -> None:
        """Close the pool and the change counter's connection."""
        counter, self._counter = self._counter, None
        if counter is not None:
            await counter.close()
        await super().close_connection_pool()

    def transaction(self, allow_nested: bool = True) -> PostgresTransaction:
        """Like Piccolo's, but the transaction releases what it acquired."""
        return ClosingPostgresTransaction(engine=self, allow_nested=allow_nested)

    async def _run_in_new_connection(
        self, query: str, args: Any = None
    ) -> list[asyncpg.Record]:
        """One query on a connection of its own, closed on every error.

        Piccolo closes it only on a ``PostgresError``; an argument the driver
        cannot encode, a dropped socket or a cancellation left it open.
        """
        connection = await self.get_new_connection()
        try:
            rows: list[asyncpg.Record] = await connection.fetch(query, *(args or []))
        finally:
            await release_postgres(connection, None)
        return rows
