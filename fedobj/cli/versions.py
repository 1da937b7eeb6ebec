"""``fedobj versions``: the model versions the catalog records: list, inspect,
roll back, and prune the artifacts of old ones from the registry."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from fedobj.cli.common import (
    DbOpt,
    RegistryOpt,
    actor,
    console,
    fail,
    open_catalog,
    open_store,
)
from fedobj.errors import FedObjError

versions_app = typer.Typer(
    help="Model versions: list, show, roll back.", no_args_is_help=True
)


@versions_app.command("list")
def versions_list(
    run: Annotated[str | None, typer.Option(help="only this run")] = None,
    db: DbOpt = None,
) -> None:
    """Versions, newest first; the current one is marked."""
    try:
        rows = open_catalog(db).list_versions(run_id=run, limit=10_000)
    except FedObjError as exc:
        raise fail(exc) from exc
    table = Table()
    for col in ("", "version", "run", "round", "classes", "accuracy", "created"):
        table.add_column(col)
    for v in sorted(rows, key=lambda v: v.number, reverse=True):
        table.add_row(
            "*" if v.is_current else "",
            v.name,
            v.run_id,
            str(v.round),
            str(v.class_map.num_classes),
            "" if v.accuracy is None else f"{v.accuracy:.4f}",
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@versions_app.command("show")
def versions_show(
    version: Annotated[str, typer.Argument(help="name (v0003) or id")] = "current",
    db: DbOpt = None,
) -> None:
    """One version's metrics, class map, artifacts and provenance, as JSON."""
    catalog = open_catalog(db)
    try:
        v = (
            catalog.current_version()
            if version == "current"
            else (catalog.get_version(version))
        )
    except FedObjError as exc:
        raise fail(exc) from exc
    if v is None:
        raise fail(FileNotFoundError("no version yet"))
    print(
        json.dumps(
            {
                "id": str(v.id),
                "name": v.name,
                "current": v.is_current,
                "run_id": v.run_id,
                "round": v.round,
                "parent_id": str(v.parent_id) if v.parent_id else None,
                "metrics": v.metrics,
                "class_map": v.class_map.to_dict(),
                "checkpoint_uri": v.checkpoint_uri,
                "checkpoint_sha256": v.checkpoint_sha256,
                "size_bytes": v.size_bytes,
                "provenance": v.provenance,
                "created_at": v.created_at.isoformat(),
            },
            indent=2,
            default=str,
        )
    )


@versions_app.command("rollback")
def versions_rollback(
    version: Annotated[str, typer.Argument(help="name (v0003) or id")],
    db: DbOpt = None,
) -> None:
    """Make an older version current; a running run continues from it next round."""
    try:
        v = open_catalog(db).set_current(version, actor=actor())
    except FedObjError as exc:
        raise fail(exc) from exc
    console.print(f"{v.name} (run {v.run_id}, round {v.round}) is now current")


@versions_app.command("prune")
def versions_prune(
    keep: Annotated[int, typer.Option(help="newest versions to keep")] = 10,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list")] = False,
    registry: RegistryOpt = None,
    db: DbOpt = None,
) -> None:
    """Delete old versions' artifacts (never the current one or a kept parent)."""
    from fedobj.pruning import prune_versions

    try:
        pruned = prune_versions(open_catalog(db), open_store(registry), keep, dry_run)
    except (FedObjError, ValueError) as exc:
        raise fail(exc) from exc
    verb = "would prune" if dry_run else "pruned"
    console.print(
        f"{verb} {len(pruned)} versions: "
        + (", ".join(v.name for v in pruned) or "none")
    )
