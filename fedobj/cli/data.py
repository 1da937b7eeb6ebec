"""``fedobj data``: what a folder of images would give training, before a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedobj.cli.common import console, err_console, fail
from fedobj.errors import FedObjError

data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)


@data_app.command("check")
def data_check(
    directory: Annotated[Path, typer.Argument(help="DIR/<category-slug>/<images>")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Report usable images per category and every skipped file with why."""
    from fedobj.data.image_folder import check_image_folder

    try:
        report = check_image_folder(directory)
    except FedObjError as exc:
        raise fail(exc) from exc
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title=f"{report.root}")
        table.add_column("category (folder)")
        table.add_column("images", justify="right")
        for slug, n in sorted(report.counts.items()):
            table.add_row(slug, str(n))
        table.add_row("[bold]total[/bold]", f"[bold]{report.total}[/bold]")
        console.print(table)
        if report.skipped:
            skipped = Table(title=f"skipped {len(report.skipped)} files")
            skipped.add_column("file")
            skipped.add_column("reason")
            for path, reason in report.skipped[:50]:
                skipped.add_row(path, reason)
            if len(report.skipped) > 50:
                skipped.add_row("…", f"{len(report.skipped) - 50} more (use --json)")
            console.print(skipped)
    if report.total == 0:
        err_console.print("[red]no usable images: this folder cannot train[/red]")
        raise typer.Exit(code=1)
