"""A change counter: what serving processes cache is revalidated with one read.

The admin API serves the category list, the current version and the class map
from memory (:mod:`fedobj.catalog.cache`) and asks the database only "has the
catalog changed?". Every writer must answer that truthfully, the round loop in
another process and a hand-run SQL statement included, so the counter is bumped
by triggers on the two tables those reads come from, in the writing transaction:
a reader sees the new counter exactly when it can see the new rows.

On PostgreSQL the triggers are *deferred constraint* triggers: they run at
commit, so the counter row is the last lock every writing transaction takes and
cannot be part of a lock-order cycle with the catalog's table and counter locks.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-12-07T13:30:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "change counter bumped by category and model_version writes"

TABLES = ("category", "model_version")
EVENTS = ("INSERT", "UPDATE", "DELETE")

SEED = (
    "INSERT INTO catalog_counter (name, value) VALUES ('changes', 0) "
    "ON CONFLICT (name) DO NOTHING"
)
BUMP = "UPDATE catalog_counter SET value = value + 1 WHERE name = 'changes'"

SQLITE_FORWARDS = tuple(
    f"CREATE TRIGGER IF NOT EXISTS {table}_{event.lower()}_changes "
    f"AFTER {event} ON {table} BEGIN {BUMP}; END"
    for table in TABLES
    for event in EVENTS
)
SQLITE_BACKWARDS = tuple(
    f"DROP TRIGGER IF EXISTS {table}_{event.lower()}_changes"
    for table in TABLES
    for event in EVENTS
)

POSTGRES_FORWARDS = (
    "CREATE OR REPLACE FUNCTION catalog_bump_changes() RETURNS trigger "
    f"LANGUAGE plpgsql AS $$ BEGIN {BUMP}; RETURN NULL; END $$",
    *(
        f"CREATE CONSTRAINT TRIGGER {table}_changes "
        f"AFTER INSERT OR UPDATE OR DELETE ON {table} "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        "EXECUTE FUNCTION catalog_bump_changes()"
        for table in TABLES
    ),
)
POSTGRES_BACKWARDS = (
    *(f"DROP TRIGGER IF EXISTS {table}_changes ON {table}" for table in TABLES),
    "DROP FUNCTION IF EXISTS catalog_bump_changes()",
)


async def _run_all(sqlite: tuple[str, ...], postgres: tuple[str, ...]) -> None:
    # The migration runner holds a transaction on this engine: all or nothing.
    engine = engine_finder()
    assert engine is not None
    for sql in sqlite if engine.engine_type == "sqlite" else postgres:
        await engine.run_ddl(sql)


async def forwards() -> MigrationManager:
    manager = MigrationManager(
        migration_id=ID, app_name="catalog", description=DESCRIPTION
    )

    async def run() -> None:
        await _run_all((SEED, *SQLITE_FORWARDS), (SEED, *POSTGRES_FORWARDS))

    async def run_backwards() -> None:
        await _run_all(SQLITE_BACKWARDS, POSTGRES_BACKWARDS)

    manager.add_raw(run)
    manager.add_raw_backwards(run_backwards)
    return manager
