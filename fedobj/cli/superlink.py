"""``fedobj superlink``: a local simulation SuperLink that fedobj starts, finds
again and stops (:class:`fedobj.superlink.LocalSuperLink`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedobj.cli.common import console, fail, outputs_dir
from fedobj.superlink import LocalSuperLink

link_app = typer.Typer(
    help="A local simulation SuperLink owned by fedobj.", no_args_is_help=True
)

HomeOpt = Annotated[Path, typer.Option("--home", help="FLWR_HOME for the SuperLink")]
PortOpt = Annotated[int, typer.Option("--port", help="SuperLink HTTP port")]
CtlOpt = Annotated[int, typer.Option("--control-port", help="Control API port")]


def _link(home: Path, port: int, control_port: int) -> LocalSuperLink:
    extra = {"FEDOBJ_OUTPUTS_DIR": str(outputs_dir(None))}
    return LocalSuperLink(home.resolve(), port, control_port, extra)


@link_app.command("start")
def superlink_start(
    home: HomeOpt = Path(".flwr"), port: PortOpt = 39191, control_port: CtlOpt = 39193
) -> None:
    """Start a simulation SuperLink in the background (reused if already ours)."""
    link = _link(home, port, control_port)
    try:
        pid = link.start()
    except RuntimeError as exc:
        raise fail(exc) from exc
    console.print(f"SuperLink on 127.0.0.1:{port} (pid {pid}); log {link.log_file}")


@link_app.command("stop")
def superlink_stop(
    home: HomeOpt = Path(".flwr"), port: PortOpt = 39191, control_port: CtlOpt = 39193
) -> None:
    """Stop the SuperLink and every process it started."""
    link = _link(home, port, control_port)
    stopped = link.stop()
    console.print(
        "stopped SuperLink" if stopped else "no SuperLink of ours was running"
    )
    if link.is_healthy():
        raise fail(
            RuntimeError(
                f"something else still serves 127.0.0.1:{port} "
                "(a SuperLink that `flwr run` "
                "started itself?); find it with `pgrep -af flower-superlink`"
            )
        )
