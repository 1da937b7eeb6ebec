"""``fedobj catalog``: the object categories, i.e. the classifier's head rows.

Every write names its actor (:func:`fedobj.cli.common.actor`) for the audit trail.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fedobj.cli.common import DbOpt, actor, console, fail, open_catalog
from fedobj.errors import FedObjError

catalog_app = typer.Typer(
    help="Object categories (the classifier's rows).", no_args_is_help=True
)


@catalog_app.command("add")
def catalog_add(
    name: Annotated[str, typer.Argument(help='display name, e.g. "Ankle boot"')],
    description: Annotated[str, typer.Option(help="free text")] = "",
    db: DbOpt = None,
) -> None:
    """Add a category; running federations grow their head from the next round."""
    try:
        c = open_catalog(db).add_category(name, description, actor=actor())
    except FedObjError as exc:
        raise fail(exc) from exc
    console.print(f"added {c.name!r} (folder {c.slug!r}) as class {c.class_index}")


@catalog_app.command("list")
def catalog_list(
    all_: Annotated[bool, typer.Option("--all", help="include inactive")] = False,
    db: DbOpt = None,
) -> None:
    """Categories with their class index, folder slug and reported samples."""
    try:
        rows = open_catalog(db).list_categories(
            active=None if all_ else True, limit=10_000
        )
    except FedObjError as exc:
        raise fail(exc) from exc
    table = Table()
    for col in ("index", "name", "folder", "active", "samples"):
        table.add_column(col)
    for c in rows:
        table.add_row(
            str(c.class_index),
            c.name,
            c.slug,
            "yes" if c.is_active else "no",
            str(c.sample_count),
        )
    console.print(table)


@catalog_app.command("deactivate")
def catalog_deactivate(
    key: Annotated[str, typer.Argument(help="name, slug, id or class index")],
    db: DbOpt = None,
) -> None:
    """Mask a category: its row stays, its index is never reused (contract 9)."""
    try:
        lookup: str | int = int(key) if key.isdigit() else key
        c = open_catalog(db).deactivate_category(lookup, actor=actor())
    except FedObjError as exc:
        raise fail(exc) from exc
    console.print(f"deactivated {c.name!r} (class {c.class_index})")
