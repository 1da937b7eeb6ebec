"""``fedobj runs`` and ``fedobj run``: start a run, then read what runs left in
the outputs folder (``run.json``, ``summary.json``, ``metrics.parquet``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedobj.cli.common import OutputsOpt, console, err_console, fail, outputs_dir
from fedobj.errors import FedObjError

runs_app = typer.Typer(help="Runs and their outputs.", no_args_is_help=True)


@runs_app.command("list")
def runs_list(outputs: OutputsOpt = None) -> None:
    """Runs found in the outputs folder, newest first."""
    root = outputs_dir(outputs)
    runs = sorted(
        (p for p in root.glob("*/run.json") if p.parent.name != "latest"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    table = Table(title=str(root))
    for col in ("run", "rounds", "final central acc", "seconds"):
        table.add_column(col)
    for run_json in runs:
        summary_path = run_json.parent / "summary.json"
        s = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        acc = s.get("final_central_accuracy")
        table.add_row(
            run_json.parent.name,
            str(s.get("rounds", "running?")),
            "n/a" if acc is None else f"{acc:.4f}",
            f"{s['seconds']:.0f}" if "seconds" in s else "",
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="run id, or 'latest'")] = "latest",
    outputs: OutputsOpt = None,
) -> None:
    """One run's summary and per-round metrics."""
    import pyarrow.parquet as pq

    folder = outputs_dir(outputs) / run
    if not (folder / "run.json").exists():
        raise fail(FileNotFoundError(f"no run at {folder}"))
    folder = folder.resolve()
    summary = folder / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        acc = s.get("final_central_accuracy")
        console.print(
            f"run {s['run_id']}: {s['rounds']} rounds in {s['seconds']:.0f} s, "
            f"final central accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'}"
        )
    metrics = folder / "metrics.parquet"
    if metrics.exists():
        rows = [r for r in pq.read_table(metrics).to_pylist() if r["kind"] == "round"]
        table = Table()
        for col in (
            "round",
            "nodes",
            "central acc",
            "central loss",
            "fed acc",
            "lr",
            "seconds",
        ):
            table.add_column(col, justify="right")

        def f(v: float | None, p: int = 4) -> str:
            return "" if v is None else f"{v:.{p}f}"

        for r in rows:
            table.add_row(
                str(r["round"]),
                f"{r['nodes_replied']}/{r['nodes_sampled']}",
                f(r["central_accuracy"]),
                f(r["central_loss"]),
                f(r["accuracy"]),
                f(r["lr"]),
                f(r["seconds"], 1),
            )
        console.print(table)
    console.print(f"outputs: {folder}")


def run_cmd(
    app_dir: Annotated[Path, typer.Option("--app", help="the Flower app")] = Path("."),
    connection: Annotated[
        str | None,
        typer.Option(help="SuperLink connection in $FLWR_HOME/config.toml"),
    ] = None,
    federation_config: Annotated[
        str, typer.Option(help="as for flwr run, e.g. 'num-supernodes=10'")
    ] = "",
    run_config: Annotated[
        str, typer.Option(help="as for flwr run, e.g. 'num-server-rounds=3'")
    ] = "",
    outputs: OutputsOpt = None,
) -> None:
    """``flwr run --stream`` that exits by how the run ended.

    Flower's ``flwr run --stream`` returns 0 even when the run failed; this reads
    the run's status from the SuperLink, exits 1 with the run's error in one line
    when it did not complete, and otherwise shows that run's (never an older
    run's) rounds. A ``--run-config`` naming a retired or unknown key exits 1
    before the run is submitted, saying which (Flower's own refusal names the
    key but not why).
    """
    from fedobj.config import check_keys, parse_overrides
    from fedobj.launch import launch

    if run_config:  # a retired or misspelt key: one line, before anything starts
        try:
            check_keys(parse_overrides(run_config))
        except FedObjError as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(code=1) from None
    args = [str(app_dir), *([connection] if connection else [])]
    if federation_config:
        args += ["--federation-config", federation_config]
    if run_config:
        args += ["--run-config", run_config]
    outcome = launch(args, os.environ, connection=connection)
    if not outcome.completed:
        err_console.print(f"[red]error:[/red] {outcome.describe()}")
        raise typer.Exit(code=1)
    folder = outputs_dir(outputs) / str(outcome.run_id)
    if (folder / "run.json").exists():
        runs_show(str(outcome.run_id), outputs)
    else:
        console.print(
            f"{outcome.describe()}; its outputs are not under {folder.parent}"
        )
