"""Piccolo app definition: the catalog's tables and where its migrations live.

``piccolo migrations new catalog --auto`` (with
``PICCOLO_CONF=fedobj.catalog.piccolo_conf``) diffs ``tables.py`` against the
committed migrations in ``piccolo_migrations/``; those files, not ``tables.py``,
are what :func:`fedobj.catalog.migrate` applies to a database.
"""

from __future__ import annotations

from pathlib import Path

from piccolo.conf.apps import AppConfig

from fedobj.catalog.tables import ALL_TABLES

APP_CONFIG = AppConfig(
    app_name="catalog",
    migrations_folder_path=str(Path(__file__).resolve().parent / "piccolo_migrations"),
    table_classes=list(ALL_TABLES),
    migration_dependencies=[],
    commands=[],
)
