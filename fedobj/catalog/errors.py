"""Exceptions the catalog raises on purpose.

Callers never see a driver exception (``sqlite3.IntegrityError``, asyncpg's
``UniqueViolationError``) for a situation we can name: the admin API maps these
classes to HTTP statuses (``ConflictError`` -> 409, ``NotFoundError`` -> 404,
``CatalogValueError`` -> 422, ``DatabaseUnavailableError`` -> 503), the CLI to one
line, and the ServerApp to a log line before round 1.
"""

from __future__ import annotations

from fedobj.errors import FedObjError


class CatalogError(FedObjError):
    """Base class for every catalog error."""


class ConflictError(CatalogError):
    """The request contradicts the catalog's current state (HTTP 409)."""


class DuplicateCategoryError(ConflictError, ValueError):
    """A category with that name (compared case-insensitively) or slug exists."""


class DuplicateVersionError(ConflictError, ValueError):
    """A model version with that name exists."""


class CategoryInUseError(ConflictError):
    """A model version has trained on the category: deactivate it instead.

    DESIGN.md contract 9: once a head row has meant this category, deleting the row
    would make old checkpoints unreadable, so only never-seen categories can go.
    """


class VersionPrunedError(ConflictError):
    """The version's checkpoint was pruned, so it cannot become current."""


class LeaseHeldError(ConflictError):
    """Another live run holds the catalog's run lease."""


class NotFoundError(CatalogError, LookupError):
    """No row matches the id, slug, name or index asked for."""


class CatalogValueError(CatalogError, ValueError):
    """An argument is out of range: a negative count, an unknown status (HTTP 422)."""


class InvalidCategoryError(CatalogValueError):
    """A category name is empty, too long, or has no letters or digits for a slug."""


class DatabaseUnavailableError(CatalogError, ConnectionError):
    """The catalog database cannot be reached, is locked, or has no schema yet.

    The message names the database (password redacted) and what to do next.
    """


class DatabaseWriteError(DatabaseUnavailableError):
    """The database refused to store anything: disk full, I/O error, read-only.

    A kind of :class:`DatabaseUnavailableError` (HTTP 503, one CLI line) because
    the cure is the same (an operator frees space or fixes the storage, then
    retries) and nothing was written: the transaction was rolled back and its
    connection closed. The message names the database, the cause and, for a
    SQLite file, the free space left beside it.
    """
