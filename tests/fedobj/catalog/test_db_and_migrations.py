"""Engine selection, migrations, and what an unreachable database looks like."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from piccolo.apps.migrations.commands.new import AutoMigrationManager
from piccolo.engine.sqlite import SQLiteEngine

from fedobj.catalog import (
    DatabaseUnavailableError,
    SyncCatalog,
    migrate,
    pending_migrations,
    resolve_url,
)
from fedobj.catalog.migrate import migration_ids
from fedobj.catalog.piccolo_app import APP_CONFIG
from fedobj.errors import ConfigError


def test_resolve_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDOBJ_DATABASE_URL", raising=False)
    db = tmp_path / "c.db"
    assert resolve_url(f"sqlite://{db}").target == str(db)
    assert resolve_url(f"sqlite:///{db}").target == str(db)  # four slashes
    assert resolve_url(db).kind == "sqlite"
    monkeypatch.chdir(tmp_path)
    assert resolve_url("rel.db").target == str(tmp_path / "rel.db")
    assert resolve_url(None, default_path="d.db").target == str(tmp_path / "d.db")

    pg = resolve_url("postgres://bob:secret@db.example:6543/cat?sslmode=require")
    assert pg.kind == "postgres"
    assert pg.target.startswith("postgresql://bob:secret@db.example:6543/cat")
    assert "secret" not in pg.display and "bob@db.example:6543/cat" in pg.display
    assert resolve_url("postgresql+asyncpg://h/db").target == "postgresql://h/db"

    monkeypatch.setenv("FEDOBJ_DATABASE_URL", "postgresql://envhost/envdb")
    assert resolve_url(None, default_path="ignored.db").target.endswith("envhost/envdb")
    assert resolve_url(db).kind == "sqlite"  # an explicit argument wins


@pytest.mark.parametrize("bad", ["mysql://h/db", "sqlite:///:memory:", ":memory:"])
def test_resolve_url_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        resolve_url(bad)


def test_resolve_url_needs_something(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDOBJ_DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="FEDOBJ_DATABASE_URL"):
        resolve_url(None)


def test_migrate_is_idempotent(db_url: str) -> None:
    assert pending_migrations(db_url) == migration_ids()
    assert migrate(db_url) == migration_ids()
    assert migrate(db_url) == []
    assert pending_migrations(db_url) == []
    SyncCatalog(db_url).ping()


def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "c.db"  # folders are created
    migrate(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    engine = SyncCatalog(path).aio.engine
    assert isinstance(engine, SQLiteEngine)
    assert engine.connection_kwargs["timeout"] >= 5  # busy timeout, seconds


def test_committed_migrations_match_tables() -> None:
    """``tables.py`` and the migration files must describe the same schema."""
    saved = list(sys.path)
    try:
        statements = asyncio.run(
            AutoMigrationManager().get_alter_statements(app_config=APP_CONFIG)
        )
    finally:
        sys.path[:] = saved
    changes = [s for group in statements for s in group.statements]
    assert changes == [], "run: piccolo migrations new catalog --auto"


def test_unreachable_postgres_is_a_clear_error() -> None:
    url = "postgresql://fedobj@127.0.0.1:1/x"
    catalog = SyncCatalog(url)  # constructing touches nothing
    with pytest.raises(DatabaseUnavailableError) as info:
        catalog.list_categories()
    message = str(info.value)
    assert "127.0.0.1:1" in message and "cannot reach" in message
    with pytest.raises(DatabaseUnavailableError, match="127.0.0.1:1"):
        migrate(url)
    with pytest.raises(DatabaseUnavailableError):
        asyncio.run(catalog.aio.snapshot())


def test_password_never_in_message() -> None:
    with pytest.raises(DatabaseUnavailableError) as info:
        SyncCatalog("postgresql://u:hunter2@127.0.0.1:1/x").snapshot()
    assert "hunter2" not in str(info.value)


def test_unmigrated_database_says_so(db_url: str) -> None:
    catalog = SyncCatalog(db_url)
    with pytest.raises(DatabaseUnavailableError, match="migrate"):
        catalog.list_categories()
    with pytest.raises(DatabaseUnavailableError, match="migrat"):
        catalog.ping()


def test_library_imports_neither_flower_nor_litestar() -> None:
    code = (
        "import sys, fedobj.catalog; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'litestar')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
