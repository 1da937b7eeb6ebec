"""What every part of :class:`fedobj.catalog.Catalog` shares.

The engine and its bound tables, the write transaction, the clock, and the
decorator that turns "cannot connect" / "no such table" driver errors into
:class:`DatabaseUnavailableError` at the public method boundary.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

from piccolo.engine.postgres import PostgresEngine

from fedobj.catalog.cache import ReadCache
from fedobj.catalog.db import (
    BoundTables,
    bind_tables,
    make_engine,
    resolve_url,
    unavailable_error,
    unstorable_value_error,
    write_transaction,
)
from fedobj.catalog.errors import CatalogValueError
from fedobj.errors import FedObjError

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="CatalogBase")


def utcnow() -> datetime:
    """Timezone-aware now; both databases store ``timestamptz`` in UTC."""
    return datetime.now(UTC)


class CatalogBase:
    """Engine, bound tables and helpers; the mixins add the operations.

    Parameters
    ----------
    url
        Database URL or SQLite path; ``None`` reads ``$FEDOBJ_DATABASE_URL``.
    default_path
        SQLite file used when neither ``url`` nor the environment names one.
    clock
        Returns "now"; replaceable so tests can age a lease without sleeping.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        default_path: str | os.PathLike[str] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.spec = resolve_url(url, default_path)
        self.engine = make_engine(self.spec)
        self.tables: BoundTables = bind_tables(self.engine)
        self.clock = clock
        self._read_cache: ReadCache | None = None

    def cache_reads(self) -> ReadCache:
        """Serve the hot reads from memory from now on (a serving process).

        See :mod:`fedobj.catalog.cache`: each cached read then costs one read
        of the database's change counter. Returns the cache (its hit counts).
        """
        if self._read_cache is None:
            self._read_cache = ReadCache(self.change_count)
        return self._read_cache

    async def change_count(self) -> int:
        """How many times a category or model version was written, ever."""
        count: int = await self.engine.change_count()
        return count

    @property
    def url(self) -> str:
        """The database as logs may show it (password removed)."""
        return self.spec.display

    @property
    def is_postgres(self) -> bool:
        return isinstance(self.engine, PostgresEngine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.display!r})"

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One write transaction (nested calls join the outer one)."""
        async with write_transaction(self.engine):
            yield

    async def _audit(
        self,
        actor: str | None,
        action: str,
        target: str = "",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Leave an audit row for an admin write, inside the caller's transaction.

        ``actor`` None means the write is the system's own (a run registering a
        version, seeding categories): no row. Called within ``_write()`` so the
        change and its audit row commit or roll back together.
        """
        if actor is None:
            return
        t = self.tables.AuditEntry
        await t.insert(
            t(
                at=self.clock(),
                actor=actor[:64],
                action=action,
                target=target[:255],
                detail=plain_json(dict(detail or {}), f"audit {action}"),
            )
        )

    async def _lock(self, table: str, mode: str) -> None:
        """Take a PostgreSQL table lock for the rest of the transaction.

        SQLite needs none: its ``BEGIN IMMEDIATE`` already serialises writers.
        """
        if self.is_postgres:
            await self.tables.Counter.raw(f'LOCK TABLE "{table}" IN {mode} MODE')

    async def _next_number(self, counter: str) -> int:
        """Hand out the next number of ``counter``; never the same one twice.

        The ``UPDATE ... RETURNING`` locks the counter row until commit on
        PostgreSQL, so concurrent callers queue instead of colliding.
        """
        t = self.tables.Counter
        rows = (
            await t.update({t.value: t.value + 1}, force=True)
            .where(t.name == counter)
            .returning(t.value)
        )
        if not rows:
            await t.insert(t(name=counter, value=0)).on_conflict(action="DO NOTHING")
            return await self._next_number(counter)
        return int(rows[0]["value"]) - 1


def guarded(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Re-raise connection and missing-schema failures as domain errors."""

    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except FedObjError:
            raise
        except Exception as exc:
            mapped = unavailable_error(exc, self.spec) or unstorable_value_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    return wrapper


def plain_json(value: Any, where: str) -> Any:
    """``value`` as JSON-safe Python: numpy scalars unwrapped, NaN/inf as None.

    PostgreSQL's ``json`` type rejects ``NaN``, and metrics computed with numpy
    arrive as ``np.float32``; both would otherwise fail deep in the driver.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_json(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v, where) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None) or getattr(value, "tolist", None)
    if callable(item):
        return plain_json(item(), where)
    raise CatalogValueError(f"{where}: {type(value).__name__} is not JSON data")


def finite_or_none(value: Any) -> float | None:
    """A float metric, or None when missing or not finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
