"""Rules the ORM cannot declare portably: one current version, unique run rounds.

DESIGN.md contract 6 wants "exactly one current version" enforced by the database,
not only by code. A partial unique index over ``is_current`` admits any number of
``false`` rows and at most one ``true`` row, with the same SQL on SQLite (3.8+) and
PostgreSQL. ``(run_id, round)`` is a unique index rather than Piccolo's
``Unique`` constraint, which Piccolo adds with ``ALTER TABLE`` (not in SQLite).
The counter rows make ``class_index`` and version numbers monotonic
across deletes; the lease row lets acquiring the lease be one conditional UPDATE.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-11-22T20:13:35:991068"
VERSION = "1.38.0"
DESCRIPTION = "one current version, run-round index, counters, lease row"

FORWARDS = (
    "CREATE UNIQUE INDEX IF NOT EXISTS model_version_one_current "
    "ON model_version (is_current) WHERE is_current",
    "CREATE UNIQUE INDEX IF NOT EXISTS training_round_run_round "
    "ON training_round (run_id, round)",
    "INSERT INTO catalog_counter (name, value) VALUES ('class_index', 0) "
    "ON CONFLICT (name) DO NOTHING",
    "INSERT INTO catalog_counter (name, value) VALUES ('version', 0) "
    "ON CONFLICT (name) DO NOTHING",
    "INSERT INTO run_lease (name) VALUES ('training') ON CONFLICT (name) DO NOTHING",
)

BACKWARDS = (
    "DROP INDEX IF EXISTS model_version_one_current",
    "DROP INDEX IF EXISTS training_round_run_round",
)


async def _run_all(statements: tuple[str, ...]) -> None:
    # The migration runner holds a transaction on this same engine, so these
    # statements commit or roll back together with the rest of the migration.
    engine = engine_finder()
    assert engine is not None
    for sql in statements:
        await engine.run_ddl(sql)


async def forwards() -> MigrationManager:
    manager = MigrationManager(
        migration_id=ID, app_name="catalog", description=DESCRIPTION
    )

    async def run() -> None:
        await _run_all(FORWARDS)

    async def run_backwards() -> None:
        await _run_all(BACKWARDS)

    manager.add_raw(run)
    manager.add_raw_backwards(run_backwards)
    return manager
