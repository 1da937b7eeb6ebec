"""``fedobj deploy``: the TLS and SuperNode-authentication files a networked
deployment needs (:mod:`fedobj.deploykit`), with what each one is for."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedobj.cli.common import console, fail
from fedobj.errors import FedObjError

deploy_app = typer.Typer(
    help="TLS and SuperNode-authentication material for a deployment.",
    no_args_is_help=True,
)


@deploy_app.command("keys")
def deploy_keys(
    out: Annotated[Path, typer.Option("--out", help="folder for keys and certs")],
    nodes: Annotated[int, typer.Option("--nodes", help="SuperNode key pairs")] = 3,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="extra SuperLink name or IP for its certificate (repeat)"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace existing keys (re-register!)")
    ] = False,
    curve: Annotated[str, typer.Option(help="P-384 | P-256")] = "P-384",
    days: Annotated[int, typer.Option(help="SuperLink certificate validity")] = 365,
) -> None:
    """Make a CA, a SuperLink certificate and SuperNode OpenSSH key pairs.

    See conf/deploy/README.md for how each file is used.
    """
    from fedobj.deploykit import write_deploy_keys

    try:
        files = write_deploy_keys(
            out, nodes, host or (), force=force, curve=curve, days=days
        )
    except FedObjError as exc:
        raise fail(exc) from exc
    table = Table(title=str(files.ca_cert.parent))
    table.add_column("file")
    table.add_column("use")
    table.add_row(files.ca_cert.name, "SuperNodes + flwr CLI: --root-certificates")
    table.add_row(files.ca_key.name, "signs certificates; keep offline (0600)")
    table.add_row(f"{files.server_cert.name}, {files.server_key.name}", "SuperLink TLS")
    for node in files.nodes:
        table.add_row(
            f"{node.private_key.name}, {node.public_key.name}",
            "--auth-supernode-private-key / flwr supernode register",
        )
    console.print(table)
