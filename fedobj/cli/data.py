"""``fedobj data``: what a folder of images would give training, before a run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedobj.cli.common import console, err_console, fail, open_catalog
from fedobj.errors import ConfigError, FedObjError

if TYPE_CHECKING:
    from fedobj.data.categories import FolderMatch
    from fedobj.data.image_folder import FolderReport

data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)

CatalogOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="catalog URL or SQLite path (default $FEDOBJ_DATABASE_URL): mark the "
        "folders it does not know, which training skips",
    ),
]


@data_app.command("check")
def data_check(
    directory: Annotated[Path, typer.Argument(help="DIR/<category-slug>/<images>")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    db: CatalogOpt = None,
) -> None:
    """Report usable images per category and every skipped file with why; with a
    catalog, mark the folders training would skip (no such category, or one
    deactivated)."""
    from fedobj.data.image_folder import check_image_folder

    try:
        report = check_image_folder(directory)
    except FedObjError as exc:
        raise fail(exc) from exc
    match = _match(report, db)
    if as_json:
        out = report.to_dict()
        if match is not None:
            out["catalog"] = {
                "known": match.known,
                "inactive": list(match.inactive),
                "unknown": match.unknown,
                "trainable": sum(report.counts[f] for f in match.known),
            }
        print(json.dumps(out, indent=2))
    else:
        _print_report(report, match)
    if report.total == 0:
        err_console.print("[red]no usable images: this folder cannot train[/red]")
        raise typer.Exit(code=1)
    if match is not None and not match.known:
        err_console.print(
            "[red]no folder is an active category of the catalog: "
            "this folder cannot train[/red]"
        )
        raise typer.Exit(code=1)


def _match(report: FolderReport, db: str | None) -> FolderMatch | None:
    """The folders against the catalog's class map; None when no catalog is
    given. A check never creates a catalog: a SQLite file must exist."""
    from fedobj.catalog.db import ENV_URL, resolve_url
    from fedobj.data.categories import match_folders

    url = db or os.environ.get(ENV_URL)
    if not url:
        return None
    try:
        spec = resolve_url(url)
        if spec.kind == "sqlite" and not Path(spec.target).is_file():
            raise ConfigError(f"no catalog database at {spec.display}")
        class_map = open_catalog(url).snapshot()
    except FedObjError as exc:
        raise fail(exc) from exc
    return match_folders(report.counts, class_map)


def _print_report(report: FolderReport, match: FolderMatch | None) -> None:
    table = Table(title=f"{report.root}")
    table.add_column("category (folder)")
    table.add_column("images", justify="right")
    if match is not None:
        table.add_column("catalog")
    for slug, n in sorted(report.counts.items()):
        row = [escape(slug), str(n)]
        if match is not None:
            row.append(_mark(slug, match))
        table.add_row(*row)
    table.add_row("[bold]total[/bold]", f"[bold]{report.total}[/bold]")
    console.print(table)
    if match is not None:
        for folders, what in (
            (list(match.unknown), "no category of the catalog"),
            (list(match.inactive), "deactivated in the catalog"),
        ):
            if folders:
                n = sum(report.counts[f] for f in folders)
                console.print(
                    f"[yellow]{escape(', '.join(folders))}: {what}; training "
                    f"skips {'its' if len(folders) == 1 else 'their'} {n} "
                    "images[/yellow]"
                )
    if report.skipped:
        skipped_files = Table(title=f"skipped {len(report.skipped)} files")
        skipped_files.add_column("file")
        skipped_files.add_column("reason")
        for path, reason in report.skipped[:50]:
            skipped_files.add_row(path, reason)
        if len(report.skipped) > 50:
            skipped_files.add_row("…", f"{len(report.skipped) - 50} more (use --json)")
        console.print(skipped_files)


def _mark(folder: str, match: FolderMatch) -> str:
    if folder in match.known:
        return f"class {match.known[folder]}"
    if folder in match.inactive:
        return "[yellow]deactivated: skipped[/yellow]"
    meant = match.unknown[folder]
    hint = f" (rename to {escape(meant)}?)" if meant else ""
    return f"[red]not in the catalog: skipped[/red]{hint}"
