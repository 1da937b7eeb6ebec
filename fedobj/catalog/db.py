"""Which database the catalog talks to, and how its failures read.

DESIGN.md contract 7: a SQLite file by default, PostgreSQL (asyncpg) when
``FEDOBJ_DATABASE_URL`` says so, same tables and migrations on both. Piccolo binds a
table to an engine through ``Table._meta.db``; rather than one global engine from
``piccolo_conf.py`` we create, per catalog, subclasses of the tables bound to that
catalog's engine (:func:`bind_tables`), so several catalogs can coexist in one
process (the test suite runs SQLite and PostgreSQL side by side).

Both engines here open a connection per query or transaction and keep no pool:
Piccolo's ``run_sync`` runs every synchronous call in a fresh event loop, and an
asyncpg pool belongs to the loop that made it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

import asyncpg
from piccolo.engine.base import Engine
from piccolo.engine.postgres import PostgresEngine, PostgresTransaction
from piccolo.engine.sqlite import SQLiteEngine, SQLiteTransaction, TransactionType
from piccolo.table import Table, create_table_class

from fedobj.catalog import tables
from fedobj.catalog.errors import CatalogValueError, DatabaseUnavailableError
from fedobj.errors import ConfigError

ENV_URL = "FEDOBJ_DATABASE_URL"
"""Environment variable naming the catalog database (URL or SQLite file path)."""

SQLITE_BUSY_TIMEOUT_S = 15.0
"""How long a SQLite writer waits for another process's write lock.

The ServerApp, the admin API and the CLI share one file; a round's bookkeeping
takes milliseconds, so 15 s only expires when a process hangs holding the lock.
"""

PG_CONNECT_TIMEOUT_S = 10.0
"""asyncpg's default is 60 s: too long to learn that the server is down."""

Kind = Literal["sqlite", "postgres"]


@dataclass(frozen=True)
class DatabaseSpec:
    """A parsed database location.

    Attributes
    ----------
    kind
        ``"sqlite"`` or ``"postgres"``.
    target
        Absolute file path (SQLite) or the asyncpg DSN (PostgreSQL).
    display
        What error messages and logs show: the path, or the URL without password.
    """

    kind: Kind
    target: str
    display: str


def resolve_url(
    url: str | os.PathLike[str] | None = None,
    default_path: str | os.PathLike[str] | None = None,
) -> DatabaseSpec:
    """Turn an explicit URL/path, the environment or a default into a spec.

    Parameters
    ----------
    url
        ``sqlite:///abs/path.db``, ``postgresql://user@host:port/db`` (also
        ``postgres://`` and ``postgresql+asyncpg://``) or a bare file path. When
        ``None``, ``$FEDOBJ_DATABASE_URL`` is used.
    default_path
        SQLite file used when neither ``url`` nor the environment names one; the
        caller (ServerApp, API, CLI) derives it from its outputs directory.

    Raises
    ------
    ConfigError
        Nothing names a database, the scheme is unknown, or the URL asks for an
        in-memory SQLite database (each query opens its own connection, so an
        in-memory database would be empty every time).
    """
    raw: str | os.PathLike[str] | None = url
    if raw is None or str(raw) == "":
        raw = os.environ.get(ENV_URL) or default_path
    if raw is None or str(raw) == "":
        raise ConfigError(
            f"no catalog database: set {ENV_URL} or pass a SQLite file path"
        )
    text = os.fspath(raw)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        parts = urlsplit(text)
        dsn = urlunsplit(parts._replace(scheme="postgresql"))
        return DatabaseSpec("postgres", dsn, _redact(parts))
    if scheme == "sqlite":
        text = text[len("sqlite://") :]
        if text.startswith("//"):  # sqlite:////abs/path is absolute too
            text = text[1:]
    elif scheme:
        raise ConfigError(
            f"{ENV_URL}: unsupported database URL scheme {scheme!r}; "
            "use sqlite:///abs/path.db, a file path, or postgresql://..."
        )
    if text.lstrip("/") in ("", ":memory:") or "mode=memory" in text:
        raise ConfigError("the catalog needs a SQLite file, not an in-memory DB")
    path = str(Path(text).expanduser().resolve())
    return DatabaseSpec("sqlite", path, path)


def _redact(parts: SplitResult) -> str:
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit(("postgresql", netloc, parts.path, "", ""))


class _QuietSQLiteEngine(SQLiteEngine):
    """SQLite engine with a busy timeout and no start-up version probe."""

    async def check_version(self) -> None:
        """Skip Piccolo's probe: it only warns, and we check in ``ping``."""


class _QuietPostgresEngine(PostgresEngine):
    """asyncpg engine that does not connect when it is constructed.

    Piccolo's ``Engine.__init__`` connects to read the server version and merely
    prints a warning when that fails; we want construction to be free and the
    first real query to raise :class:`DatabaseUnavailableError` instead.
    """

    async def check_version(self) -> None:
        """Skip the probe (see the class docstring)."""

    async def prep_database(self) -> None:
        """No extensions needed: ``gen_random_uuid()`` is built in since PG 13."""


def make_engine(spec: DatabaseSpec) -> Engine[Any]:
    """Build a Piccolo engine for ``spec`` without touching the database."""
    if spec.kind == "sqlite":
        return _QuietSQLiteEngine(path=spec.target, timeout=SQLITE_BUSY_TIMEOUT_S)
    return _QuietPostgresEngine(
        config={"dsn": spec.target, "timeout": PG_CONNECT_TIMEOUT_S}
    )


class BoundTables(SimpleNamespace):
    """The catalog's tables, each a subclass bound to one engine."""

    Category: type[tables.Category]
    Counter: type[tables.Counter]
    ModelVersion: type[tables.ModelVersion]
    TrainingRound: type[tables.TrainingRound]
    Node: type[tables.Node]
    NodeRound: type[tables.NodeRound]
    Run: type[tables.Run]
    RunLease: type[tables.RunLease]
    ApiKey: type[tables.ApiKey]
    AuditEntry: type[tables.AuditEntry]
    Detection: type[tables.Detection]


def bind_tables(engine: Engine[Any]) -> BoundTables:
    """Subclass every catalog table with ``db=engine`` and the same table name.

    Piccolo copies inherited columns into a subclass (``Table.__init_subclass__``
    walks the MRO), so the subclass is the same table, only bound elsewhere.
    """
    bound: dict[str, type[Table]] = {}
    for table in tables.ALL_TABLES:
        bound[table.__name__] = create_table_class(
            class_name=table.__name__,
            bases=(table,),
            class_kwargs={"tablename": table._meta.tablename, "db": engine},
        )
    return BoundTables(**bound)


@asynccontextmanager
async def write_transaction(engine: Engine[Any]) -> AsyncIterator[None]:
    """A transaction that takes SQLite's write lock up front.

    A deferred SQLite transaction that reads first and writes later fails with
    "database is locked" when another process wrote in between, without waiting
    for the busy timeout; ``BEGIN IMMEDIATE`` waits instead. PostgreSQL's default
    read-committed transaction plus explicit row/table locks serves the same end.
    """
    tx: SQLiteTransaction | PostgresTransaction
    if isinstance(engine, SQLiteEngine):
        tx = engine.transaction(transaction_type=TransactionType.immediate)
    elif isinstance(engine, PostgresEngine):
        tx = engine.transaction()
    else:  # pragma: no cover - make_engine builds only these two
        raise TypeError(f"unsupported engine {type(engine).__name__}")
    async with tx:
        yield


# ---------------------------------------------------------------- errors

_PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)


def is_unique_violation(exc: BaseException) -> bool:
    """Whether ``exc`` is a unique-constraint failure on either database."""
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return True
    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)


def unavailable_error(
    exc: BaseException, spec: DatabaseSpec
) -> DatabaseUnavailableError | None:
    """The :class:`DatabaseUnavailableError` ``exc`` amounts to, if any.

    Connection refused, unknown host, timeouts, a missing database or role, a
    SQLite file that cannot be opened or stays locked, and tables that do not
    exist yet (a database nobody migrated) all mean "the catalog is not there";
    every other error is a bug or a constraint and is left alone.
    """
    where = f"catalog database {spec.display} ({spec.kind})"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if text.startswith("no such table"):
            return DatabaseUnavailableError(
                f"{where} has no catalog schema ({text}); run migrate() first"
            )
        if "unable to open" in text or "locked" in text or "disk I/O" in text:
            return DatabaseUnavailableError(f"cannot use {where}: {text}")
        return None
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        return DatabaseUnavailableError(
            f"{where} has no catalog schema ({exc}); run migrate() first"
        )
    if isinstance(exc, (*_PG_UNAVAILABLE, OSError)):
        reason = str(exc) or type(exc).__name__
        hint = (
            f"; is the server running, and is {ENV_URL} right?"
            if spec.kind == "postgres"
            else ""
        )
        return DatabaseUnavailableError(f"cannot reach {where}: {reason}{hint}")
    return None


def unstorable_value_error(exc: BaseException) -> CatalogValueError | None:
    """A :class:`CatalogValueError` for a value the database cannot hold.

    A NUL character or a lone surrogate in a string (from a JSON body or a URL),
    an integer beyond 64 bits: the driver refuses them deep inside a query.
    They are the caller's bad input, not a server fault, so they surface as a
    value error (the API's 422) instead of an internal error.
    """
    if isinstance(exc, UnicodeEncodeError):
        return CatalogValueError(f"text the database cannot store: {exc.reason}")
    if isinstance(exc, OverflowError):
        return CatalogValueError(f"number out of range: {exc}")
    if isinstance(exc, asyncpg.exceptions.DataError):
        return CatalogValueError(f"value the database cannot store: {exc}")
    return None
