"""The ``fedobj`` command line: the one composition root for people at a terminal.

Domain errors become one red line and exit code 2; nothing here holds logic of its
own beyond presenting what ``fedobj`` functions return. One module per command
group; this one only assembles them into ``app``, the console script's entry point
(``[project.scripts]``), in the order ``fedobj --help`` lists them.
"""

from __future__ import annotations

import typer

from fedobj.cli.admin import admin_app
from fedobj.cli.catalog import catalog_app
from fedobj.cli.data import data_app
from fedobj.cli.deploy import deploy_app
from fedobj.cli.edge import detect_cmd, export_cmd
from fedobj.cli.runs import run_cmd, runs_app
from fedobj.cli.superlink import link_app
from fedobj.cli.versions import versions_app

__all__ = ["app", "main"]

app = typer.Typer(
    help="fedobj: federated image classification whose categories grow.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(link_app, name="superlink")
app.command("run")(run_cmd)
app.add_typer(catalog_app, name="catalog")
app.add_typer(versions_app, name="versions")
app.add_typer(admin_app, name="admin")
app.command("export")(export_cmd)
app.command("detect")(detect_cmd)
app.add_typer(deploy_app, name="deploy")


def main() -> None:
    """Run the command line (what ``python -m fedobj.cli`` calls)."""
    app()
