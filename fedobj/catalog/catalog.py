"""The async catalog every caller shares: categories, versions, rounds, nodes, lease.

The admin API awaits these methods in its event loop; the strategy and the CLI use
:class:`fedobj.catalog.SyncCatalog`, which runs the same coroutines to completion.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fedobj.catalog._base import guarded
from fedobj.catalog.admin import AdminOps
from fedobj.catalog.cache import cached_read
from fedobj.catalog.categories import CategoryOps
from fedobj.catalog.engines import CatalogSQLiteEngine
from fedobj.catalog.errors import DatabaseUnavailableError
from fedobj.catalog.lease import LeaseOps
from fedobj.catalog.migrate import migrate_async, pending_migrations
from fedobj.catalog.records import VersionRecord
from fedobj.catalog.runs import RunOps
from fedobj.catalog.versions import VersionOps
from fedobj.classmap import ClassMap


class Catalog(CategoryOps, VersionOps, RunOps, LeaseOps, AdminOps):
    """Asynchronous access to one catalog database.

    Construction does not touch the database; the first query does, and raises
    :class:`fedobj.catalog.errors.DatabaseUnavailableError` with the database
    named when it cannot be reached or was never migrated.

    Parameters
    ----------
    url
        ``sqlite:///abs/file.db``, a file path, or ``postgresql://user@host/db``;
        ``None`` reads ``$FEDOBJ_DATABASE_URL``.
    default_path
        SQLite file used when neither ``url`` nor the environment names one.
    clock
        Returns the current aware datetime (tests replace it).

    Examples
    --------
    >>> catalog = Catalog("/tmp/x.db")            # doctest: +SKIP
    >>> await catalog.migrate()                    # doctest: +SKIP
    >>> await catalog.add_category("Sneaker")      # doctest: +SKIP
    """

    async def migrate(self) -> list[str]:
        """Apply pending migrations (see :func:`fedobj.catalog.migrate`)."""
        return await migrate_async(self.spec.target)

    @guarded
    async def ping(self) -> None:
        """Check that the database answers and carries the latest schema.

        Raises
        ------
        DatabaseUnavailableError
            Unreachable, or migrations are pending (the message lists them).
        """
        if self.spec.kind == "sqlite" and not Path(self.spec.target).exists():
            raise DatabaseUnavailableError(
                f"catalog database {self.url} does not exist; run migrate() first"
            )
        await self.tables.Counter.raw("SELECT 1")
        pending = await asyncio.to_thread(pending_migrations, self.spec.target)
        if pending:
            raise DatabaseUnavailableError(
                f"catalog database {self.url} lacks migrations {pending}; "
                "run migrate() first"
            )

    @guarded
    @cached_read
    async def serving_view(self) -> tuple[VersionRecord | None, ClassMap]:
        """The current version and today's class map: what a detection needs,
        in one cached read (one change-counter query) when the cache is on."""
        return await self.current_version(), await self.snapshot()

    async def start_pool(self, **kwargs: Any) -> None:
        """Keep connections open for this event loop (a serving process).

        PostgreSQL: an asyncpg pool (``kwargs`` go to it). SQLite: a few open
        connections for statements outside transactions (see
        :class:`fedobj.catalog.engines.SQLiteStatementPool`). Never used by
        :class:`SyncCatalog`: a pool belongs to the loop that made it, and every
        synchronous call runs in a loop of its own.
        """
        if isinstance(self.engine, CatalogSQLiteEngine):
            await self.engine.start_pool()
        else:
            await self.engine.start_connection_pool(**kwargs)

    async def close_pool(self) -> None:
        """Close the pool opened by :meth:`start_pool`, if any."""
        if isinstance(self.engine, CatalogSQLiteEngine):
            await self.engine.close_pool()
        elif self.engine.pool is not None:
            await self.engine.close_connection_pool()
