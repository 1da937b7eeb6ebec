"""The category catalog and run/version bookkeeping (DESIGN.md contracts 1, 3, 6-9).

One database (a SQLite file by default, PostgreSQL when ``$FEDOBJ_DATABASE_URL``
says so) holds the categories, the model versions, the rounds of every run, the
nodes and the run lease. Everything that reads or writes it goes through:

- :class:`Catalog`: async methods, for the admin API;
- :class:`SyncCatalog`: the same methods, blocking, for the strategy and the CLI;
- :func:`migrate`: brings a database to the committed schema, at every start.

>>> from fedobj.catalog import SyncCatalog, migrate     # doctest: +SKIP
>>> migrate("/srv/fedobj/catalog.db")                    # doctest: +SKIP
>>> catalog = SyncCatalog("/srv/fedobj/catalog.db")      # doctest: +SKIP
>>> catalog.seed_categories()                            # doctest: +SKIP
>>> catalog.snapshot().num_classes                       # doctest: +SKIP
10
"""

from fedobj.catalog.admin import ROLES, DetectionFilter
from fedobj.catalog.catalog import Catalog
from fedobj.catalog.db import ENV_URL, DatabaseSpec, resolve_url
from fedobj.catalog.errors import (
    CatalogError,
    CatalogValueError,
    CategoryInUseError,
    ConflictError,
    DatabaseUnavailableError,
    DatabaseWriteError,
    DuplicateCategoryError,
    DuplicateVersionError,
    InvalidCategoryError,
    LeaseHeldError,
    NotFoundError,
    VersionPrunedError,
)
from fedobj.catalog.migrate import migrate, migrate_async, pending_migrations
from fedobj.catalog.records import (
    ApiKeyRecord,
    AuditRecord,
    CategoryRecord,
    CategoryStats,
    DetectionRecord,
    LeaseRecord,
    NodeRecord,
    NodeRoundRecord,
    RoundRecord,
    RunRecord,
    RunSummary,
    VersionBrief,
    VersionRecord,
)
from fedobj.catalog.sync import SyncCatalog

__all__ = [
    "ENV_URL",
    "ROLES",
    "ApiKeyRecord",
    "AuditRecord",
    "CategoryStats",
    "DetectionRecord",
    "Catalog",
    "CatalogError",
    "CatalogValueError",
    "CategoryInUseError",
    "CategoryRecord",
    "ConflictError",
    "DatabaseSpec",
    "DatabaseUnavailableError",
    "DatabaseWriteError",
    "DuplicateCategoryError",
    "DuplicateVersionError",
    "InvalidCategoryError",
    "LeaseHeldError",
    "LeaseRecord",
    "NodeRecord",
    "NodeRoundRecord",
    "NotFoundError",
    "RoundRecord",
    "DetectionFilter",
    "RunRecord",
    "RunSummary",
    "SyncCatalog",
    "VersionPrunedError",
    "VersionBrief",
    "VersionRecord",
    "migrate",
    "migrate_async",
    "pending_migrations",
    "resolve_url",
]
