"""Which database the catalog talks to, and how its failures read.

DESIGN.md contract 7: a SQLite file by default, PostgreSQL (asyncpg) when
``FEDOBJ_DATABASE_URL`` says so, same tables and migrations on both. Piccolo binds a
table to an engine through ``Table._meta.db``; rather than one global engine from
``piccolo_conf.py`` we create, per catalog, subclasses of the tables bound to that
catalog's engine (:func:`bind_tables`), so several catalogs can coexist in one
process (the test suite runs SQLite and PostgreSQL side by side).

Both engines (:mod:`fedobj.catalog.engines`) open a connection per query or
transaction and close it on every path, errors included; only the admin API adds
an asyncpg pool, in its one long-lived loop. Piccolo's ``run_sync`` runs every
synchronous call in a fresh event loop, and a pool belongs to the loop that made it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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
from fedobj.catalog.engines import CatalogPostgresEngine, CatalogSQLiteEngine
from fedobj.catalog.errors import (
    CatalogValueError,
    DatabaseUnavailableError,
    DatabaseWriteError,
)
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


def make_engine(spec: DatabaseSpec) -> CatalogSQLiteEngine | CatalogPostgresEngine:
    """Build a Piccolo engine for ``spec`` without touching the database."""
    if spec.kind == "sqlite":
        return CatalogSQLiteEngine(path=spec.target, timeout=SQLITE_BUSY_TIMEOUT_S)
    return CatalogPostgresEngine(
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
    The engines' transactions roll back and close their connection whatever
    fails, ``BEGIN`` and ``COMMIT`` included (see :mod:`fedobj.catalog.engines`).
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
    asyncpg.exceptions.AdminShutdownError,  # pg_terminate_backend, fast shutdown
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
)

_PG_WRITE_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: disk full, out of memory
    asyncpg.exceptions.PostgresIOError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby, or read-only mode
)

_SQLITE_WRITE_REFUSED = (
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_READONLY,
)
"""Primary SQLite result codes for "the storage refused": disk full, an I/O error
(on a full disk, creating the ``-shm`` file fails this way), a read-only file."""

_SQLITE_WRITE_TEXT = ("disk is full", "disk I/O error", "readonly database")
"""The same, for an error that lost its code on the way (re-raised elsewhere)."""

_SQLITE_UNREACHABLE = (
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
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
    a full disk, an I/O error or a read-only database mean "it cannot store
    anything now" (:class:`DatabaseWriteError`). Every other error is a bug or a
    constraint and is left alone.
    """
    where = f"catalog database {spec.display} ({spec.kind})"
    if isinstance(exc, sqlite3.Error):
        text = _one_line(exc)
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code in _SQLITE_WRITE_REFUSED or any(m in text for m in _SQLITE_WRITE_TEXT):
            return _write_error(spec, text)
        if not isinstance(exc, sqlite3.OperationalError):
            return None
        if text.startswith("no such table"):
            return DatabaseUnavailableError(
                f"{where} has no catalog schema ({text}); run migrate() first"
            )
        if code in _SQLITE_UNREACHABLE or "unable to open" in text or "locked" in text:
            return DatabaseUnavailableError(f"cannot use {where}: {text}")
        return None
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        return DatabaseUnavailableError(
            f"{where} has no catalog schema ({exc}); run migrate() first"
        )
    if isinstance(exc, _PG_WRITE_REFUSED) and not isinstance(
        exc, asyncpg.exceptions.TooManyConnectionsError
    ):
        return _write_error(spec, _one_line(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS):
        return _write_error(spec, _one_line(exc))
    if isinstance(exc, (*_PG_UNAVAILABLE, OSError)):
        reason = _one_line(exc)
        hint = (
            f"; is the server running, and is {ENV_URL} right?"
            if spec.kind == "postgres"
            else ""
        )
        return DatabaseUnavailableError(f"cannot reach {where}: {reason}{hint}")
    return None


def _write_error(spec: DatabaseSpec, reason: str) -> DatabaseWriteError:
    """One line naming the database, the cause and, for a file, the free space.

    Nothing was written (the transaction rolled back), so the operator's next
    step is to make room or fix the storage and retry; the free space tells them
    whether that is the problem.
    """
    room = ""
    if spec.kind == "sqlite":
        folder = Path(spec.target).parent
        with contextlib.suppress(OSError):  # the folder may be gone as well
            room = f" ({_size(shutil.disk_usage(folder).free)} free in {folder})"
    return DatabaseWriteError(
        f"cannot write to catalog database {spec.display} ({spec.kind}): "
        f"{reason}{room}; nothing was written"
    )


def _one_line(exc: BaseException) -> str:
    """The error's text on one line (a CLI line, a problem ``detail``)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _size(n: int) -> str:
    """Bytes as people read them: ``0 B``, ``512.0 KiB``, ``3.2 GiB``."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


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
