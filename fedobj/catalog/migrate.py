"""Bring a catalog database to the latest schema with the committed migrations.

The ServerApp, the admin API and the CLI each call :func:`migrate` at start, so it
must be idempotent, quiet, and safe when two of them start at once. It drives
Piccolo's own runner (``run_forwards``) over the files in ``piccolo_migrations/``;
those files are the schema's source of truth.

Piccolo's runner finds its engine through ``engine_finder()`` (the ``DB`` of the
``$PICCOLO_CONF`` module) and caches it on its ``Migration`` table, so for the
duration of a run we point both at the engine of the database being migrated, under
a process-wide lock, and restore them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import logging
import os
import pkgutil
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any, cast

from asyncpg.exceptions import UndefinedTableError
from piccolo.apps.migrations.commands.forwards import run_forwards
from piccolo.apps.migrations.tables import Migration
from piccolo.engine.base import Engine
from piccolo.table import create_table_class
from piccolo.utils.sync import run_sync

from fedobj.catalog import piccolo_migrations
from fedobj.catalog.db import (
    DatabaseSpec,
    make_engine,
    resolve_url,
    unavailable_error,
)
from fedobj.catalog.errors import CatalogError

APP_NAME = "catalog"
CONF_MODULE = "fedobj.catalog.piccolo_conf"

_log = logging.getLogger(__name__)
_lock = threading.Lock()


def migration_ids() -> list[str]:
    """IDs of the committed migrations, oldest first."""
    ids = []
    for info in pkgutil.iter_modules(piccolo_migrations.__path__):
        module = importlib.import_module(f"{piccolo_migrations.__name__}.{info.name}")
        ids.append(str(module.ID))
    return sorted(ids)


def migrate(
    url: str | os.PathLike[str] | None = None,
    *,
    default_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Apply every migration the database has not seen; return their IDs.

    Parameters
    ----------
    url, default_path
        As for :func:`fedobj.catalog.db.resolve_url`. A SQLite file and its folder
        are created if missing, and the file is switched to WAL mode, which lets
        readers (the API) proceed while a writer (the strategy) commits.

    Raises
    ------
    DatabaseUnavailableError
        The database cannot be reached or opened.
    CatalogError
        Piccolo reported a failed migration.
    """
    spec = resolve_url(url, default_path)
    with _lock:
        try:
            return run_sync(_migrate(spec))
        except CatalogError:
            raise
        except Exception as exc:
            mapped = unavailable_error(exc, spec)
            if mapped is not None:
                raise mapped from exc
            # Another process may have applied the same migration a moment ago
            # (both saw it pending; the loser's CREATE TABLE failed).
            if not run_sync(_pending(spec)):
                return []
            raise


async def migrate_async(
    url: str | os.PathLike[str] | None = None,
    *,
    default_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """:func:`migrate` for async callers; runs in a worker thread.

    The thread keeps the process-wide lock (and Piccolo's globals) away from the
    caller's event loop.
    """
    return await asyncio.to_thread(migrate, url, default_path=default_path)


def pending_migrations(
    url: str | os.PathLike[str] | None = None,
    *,
    default_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """IDs of committed migrations the database has not applied yet."""
    spec = resolve_url(url, default_path)
    try:
        return run_sync(_pending(spec))
    except Exception as exc:
        mapped = unavailable_error(exc, spec)
        if mapped is not None:
            raise mapped from exc
        raise


def _migration_table(engine: Engine[Any]) -> type[Migration]:
    table = create_table_class(
        class_name="Migration",
        bases=(Migration,),
        class_kwargs={"tablename": Migration._meta.tablename, "db": engine},
    )
    return cast(type[Migration], table)


async def _applied(engine: Engine[Any], create: bool) -> set[str]:
    table = _migration_table(engine)
    if create:
        # Piccolo's own existence check looks in every PostgreSQL schema; making
        # the table here puts it in (and finds it in) the search_path's first.
        await table.create_table(if_not_exists=True).run()
    query = table.select(table.name).where(table.app_name == APP_NAME)
    try:
        rows = await query.run()
    except UndefinedTableError:
        if create:
            raise
        return set()  # never migrated
    except sqlite3.OperationalError as exc:
        if create or "no such table" not in str(exc):
            raise
        return set()
    return {str(r["name"]) for r in rows}


async def _pending(spec: DatabaseSpec) -> list[str]:
    applied = await _applied(make_engine(spec), create=False)
    return [i for i in migration_ids() if i not in applied]


async def _migrate(spec: DatabaseSpec) -> list[str]:
    engine = make_engine(spec)
    if spec.kind == "sqlite":
        Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
        await engine.run_ddl("PRAGMA journal_mode=WAL")
    applied = await _applied(engine, create=True)
    pending = [i for i in migration_ids() if i not in applied]
    if not pending:
        return []
    conf = importlib.import_module(CONF_MODULE)
    saved_env = os.environ.get("PICCOLO_CONF")
    saved_db = getattr(conf, "DB")  # noqa: B009 - module attribute set at import
    saved_table_db = Migration._meta._db
    saved_path = list(sys.path)
    out = io.StringIO()
    os.environ["PICCOLO_CONF"] = CONF_MODULE
    setattr(conf, "DB", engine)  # noqa: B010
    Migration._meta.db = engine
    try:
        with contextlib.redirect_stdout(out):
            result = await run_forwards(app_name=APP_NAME)
    finally:
        setattr(conf, "DB", saved_db)  # noqa: B010
        Migration._meta._db = saved_table_db
        sys.path[:] = saved_path  # Piccolo prepends the migrations folder
        if saved_env is None:
            os.environ.pop("PICCOLO_CONF", None)
        else:
            os.environ["PICCOLO_CONF"] = saved_env
        for line in out.getvalue().splitlines():
            if line.strip():
                _log.debug("piccolo: %s", line.strip())
    if not result.success:
        raise CatalogError(f"migrating {spec.display} failed: {result.message}")
    _log.info("catalog %s: applied migrations %s", spec.display, pending)
    return pending


__all__ = [
    "migrate",
    "migrate_async",
    "migration_ids",
    "pending_migrations",
]
