#!/usr/bin/env python3
"""Run a Flower SuperNode on a Linux board over its local image folder.

    python mobile/run_supernode.py --superlink HOST:9092 --data-dir /data/photos \\
        (--root-certificates ca.pem | --insecure) [--device-id NAME] \\
        [--cache-dir DIR] [--auth-key KEY] [--port 9094] [--prepare 1x28] [--dry-run]

Checks the folder first (``DIR/<category-slug>/<images>``, as ``fedobj data check``
reports it) and refuses one with no usable image, then replaces itself with
``flower-supernode`` (same process id, so a service manager sees the SuperNode
itself) with node config ``data-dir``, ``cache-dir`` and ``device-id``. The
ClientApp decodes the folder once and caches the prepared arrays under
``cache-dir`` (a SuperNode starts a fresh process for every message);
``--prepare CHANNELSxSIZE`` (``1x28`` for the demo's ``cnn``) fills that cache now.
The board needs fedobj with torch installed: it trains, with what is installed
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` unless set otherwise: no
per-run ``uv sync`` download of the app's dependencies).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

try:
    import fedobj  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedobj.data.image_folder import (
    FolderReport,
    check_image_folder,
    load_image_folder,
)
from fedobj.errors import FedObjError
from fedobj.superlink import no_runtime_install


class LaunchError(FedObjError):
    """The SuperNode cannot be started as asked; the message says why."""


def default_cache_dir() -> Path:
    """Where the ClientApp caches decoded images when node config names none."""
    env = os.environ.get("FEDOBJ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fedobj"


def _quoted(key: str, value: str) -> str:
    # Node config values are TOML: a literal string cannot hold a single quote.
    if "'" in value or "\n" in value:
        raise LaunchError(f"{key} may not contain a quote or a newline: {value!r}")
    return f"{key}='{value}'"


def node_config(data_dir: Path, cache_dir: Path, device_id: str) -> str:
    """The ``--node-config`` string the ClientApp reads (``fedobj.keys``)."""
    return " ".join(
        (
            _quoted("data-dir", str(data_dir)),
            _quoted("cache-dir", str(cache_dir)),
            _quoted("device-id", device_id),
        )
    )


def supernode_binary() -> str:
    """``flower-supernode`` next to this Python (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "flower-supernode"
    if beside.is_file():
        return str(beside)
    found = shutil.which("flower-supernode")
    if found is None:
        raise LaunchError("flower-supernode not found: pip install 'flwr==1.42.0'")
    return found


def check_folder(data_dir: Path, min_images: int = 1) -> FolderReport:
    """Scan ``data_dir``; refuse it with the reasons when it cannot train."""
    report = check_image_folder(data_dir)
    if report.total < min_images:
        reasons = dict(report.skip_reasons()) or "nothing found"
        raise LaunchError(
            f"{report.root} has {report.total} usable images (need >= {min_images}); "
            f"expected {report.root}/<category-slug>/*.jpg|png|webp|bmp; "
            f"skipped: {reasons}"
        )
    return report


def build_command(args: argparse.Namespace) -> list[str]:
    """The flower-supernode command line for parsed ``args`` (paths absolute)."""
    host, _, port = str(args.superlink).rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--superlink must be HOST:PORT, got {args.superlink!r}")
    if args.insecure == (args.root_certificates is not None):
        raise LaunchError("give exactly one of --root-certificates CA.pem, --insecure")
    if args.insecure and args.auth_key is not None:
        # flower-supernode refuses this too (exit code 303), but only after starting
        raise LaunchError("--auth-key needs TLS: give --root-certificates CA.pem")
    data_dir = Path(args.data_dir).expanduser().resolve()
    cache_dir = Path(args.cache_dir or default_cache_dir()).expanduser().resolve()
    cmd = [args.supernode_bin or supernode_binary()]
    if args.insecure:
        cmd.append("--insecure")
    else:
        ca = Path(args.root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise LaunchError(f"--root-certificates {ca} does not exist")
        cmd += ["--root-certificates", str(ca)]
    if args.auth_key is not None:
        key = Path(args.auth_key).expanduser().resolve()
        if not key.is_file():
            raise LaunchError(f"--auth-key {key} does not exist")
        cmd += ["--auth-supernode-private-key", str(key)]
    cmd += [
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
        "--node-config",
        node_config(data_dir, cache_dir, args.device_id or socket.gethostname()),
    ]
    return cmd


def _prepare(spec: str, data_dir: Path, cache_dir: Path) -> None:
    channels, _, size = spec.partition("x")
    if not (channels in ("1", "3") and size.isdigit()):
        raise LaunchError(f"--prepare must be CHANNELSxSIZE like 1x28, got {spec!r}")
    data, _ = load_image_folder(data_dir, int(channels), int(size), cache_dir)
    print(f"prepared {len(data)} images ({spec}) in {cache_dir}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--superlink", required=True, help="Fleet API HOST:PORT")
    p.add_argument("--data-dir", required=True, help="DIR/<category-slug>/<images>")
    p.add_argument("--cache-dir", help="prepared-data cache (~/.cache/fedobj)")
    p.add_argument("--device-id", help="this board's name (default: hostname)")
    p.add_argument("--root-certificates", help="CA certificate of the SuperLink")
    p.add_argument("--insecure", action="store_true", help="no TLS (tests, labs)")
    p.add_argument("--auth-key", help="SuperNode private key (node authentication)")
    p.add_argument("--port", type=int, default=9094, help="SuperNode runtime API")
    p.add_argument("--min-images", type=int, default=1)
    p.add_argument("--prepare", metavar="CxS", help="decode and cache now, e.g. 1x28")
    p.add_argument("--supernode-bin", help="flower-supernode to run")
    p.add_argument("--dry-run", action="store_true", help="print the command only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cmd = build_command(args)
        report = check_folder(Path(args.data_dir).expanduser(), args.min_images)
        print(
            f"{report.root}: {report.total} images in {len(report.counts)} "
            f"categories ({', '.join(sorted(report.counts))}); "
            f"{len(report.skipped)} files skipped",
            flush=True,
        )
        if args.prepare and not args.dry_run:
            cache = Path(args.cache_dir or default_cache_dir()).expanduser()
            _prepare(args.prepare, report.root, cache.resolve())
    except FedObjError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    # Flower 1.41's SuperNode installs nothing unless given
    # --allow-runtime-dependency-installation, its SuperLink unless this variable
    # is 1: set for the SuperNode too, so that a board never downloads torch per
    # run should the SuperNode's default follow the SuperLink's
    os.execve(cmd[0], cmd, no_runtime_install(os.environ))  # never returns


if __name__ == "__main__":
    sys.exit(main())
