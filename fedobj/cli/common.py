"""What every ``fedobj`` command shares: the consoles, the one way a domain error
ends a command, and the options and resources (outputs folder, catalog, artifact
store) that several command groups open the same way.

Kept in one place so every command resolves ``--db``, ``--registry`` and
``--outputs`` identically and fails with the same one red line and exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedobj.errors import FedObjError

if TYPE_CHECKING:
    from fedobj.catalog import SyncCatalog
    from fedobj.registry import ArtifactStore

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def fail(exc: Exception) -> typer.Exit:
    """One red line on stderr and exit code 2 (the message is shown verbatim:
    a path or an SQL fragment may hold brackets that rich would read as markup)."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code=2)


def outputs_dir(outputs: Path | None) -> Path:
    """``--outputs`` if given, else ``$FEDOBJ_OUTPUTS_DIR``, else ./outputs."""
    if outputs is not None:
        return outputs
    return Path(os.environ.get("FEDOBJ_OUTPUTS_DIR", "outputs")).resolve()


OutputsOpt = Annotated[Path | None, typer.Option("--outputs", help="outputs folder")]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        help="artifact store, a folder or a pyarrow.fs URI (s3://bucket/prefix"
        "?endpoint_override=host:port&scheme=http); default $FEDOBJ_REGISTRY_URI, "
        "else the outputs folder"
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="catalog URL or SQLite path; default "
        "$FEDOBJ_DATABASE_URL, else <outputs>/catalog.db",
    ),
]


def open_store(registry: str | None) -> ArtifactStore:
    """The registry this command uses (:func:`resolve_registry_root`), or one
    red line saying why it cannot be opened."""
    from fedobj.registry import ArtifactStore, resolve_registry_root

    try:
        return ArtifactStore(resolve_registry_root(registry, outputs_dir(None)))
    except FedObjError as exc:
        raise fail(exc) from exc


def open_catalog(db: str | None) -> SyncCatalog:
    """The catalog at ``--db`` (default: beside the outputs), migrated first so a
    command never meets an older schema."""
    from fedobj.catalog import SyncCatalog

    catalog = SyncCatalog(db, default_path=outputs_dir(None) / "catalog.db")
    try:
        catalog.migrate()
    except FedObjError as exc:
        raise fail(exc) from exc
    return catalog


def actor() -> str:
    """Who the audit trail names for a write from this terminal."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"
