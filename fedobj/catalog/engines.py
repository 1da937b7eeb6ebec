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

import contextlib
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

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 10.0
"""How long closing or releasing a PostgreSQL connection may take.

Past it the connection is terminated (the socket dropped): a server that stopped
answering must not hold the caller, and the pool gets its slot back either way.
"""


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


async def _close_sqlite(connection: aiosqlite.Connection) -> None:
    """Close the connection; its worker thread ends even when ``close`` fails.

    ``aiosqlite.Connection.close`` stops the worker in a ``finally`` of its own,
    so a failure here is only logged.
    """
    try:
        await connection.close()
    except Exception as exc:
        log.warning("closing a SQLite connection failed: %s", exc)


async def _release_postgres(
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


class ClosingSQLiteTransaction(SQLiteTransaction):
    """A :class:`SQLiteTransaction` that closes its connection on every path."""

    async def __aenter__(self) -> SQLiteTransaction:
        if self._parent is not None:
            return self._parent
        self.connection = await self.get_connection()
        try:
            await self.begin()
        except BaseException:
            await _close_sqlite(self.connection)
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
            await _close_sqlite(self.connection)
        return exception is None


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
            await _release_postgres(self.connection, self.engine.pool)
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
            await _release_postgres(self.connection, self.engine.pool)
        return exception is None


class CatalogSQLiteEngine(SQLiteEngine):
    """SQLite engine with closing transactions and no start-up version probe."""

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
        """Piccolo's connection set-up, closed again if the set-up fails."""
        connection = await aiosqlite.connect(**self.connection_kwargs)
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
            await _release_postgres(connection, None)
        return rows
