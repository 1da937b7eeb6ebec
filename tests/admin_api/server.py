"""A real ``fedobj admin serve`` process for tests, with the keys made for it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedobj.adminproc import FEDOBJ, serve_admin
from tests.conftest import ROOT

__all__ = ["FEDOBJ", "Served", "serve"]


@dataclass
class Served:
    base_url: str
    keys: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@contextmanager
def serve(
    outputs: Path,
    db_url: str,
    keys: dict[str, str],
    *,
    registry: Path | None = None,
    extra: tuple[str, ...] = (),
    tls_ca: Path | None = None,
) -> Iterator[Served]:
    """``fedobj admin serve`` on a free 127.0.0.1 port until the block ends
    (fedobj.adminproc: waits for ``/health``, always stopped)."""
    with serve_admin(
        outputs, db_url, registry=registry, extra=extra, tls_ca=tls_ca, cwd=ROOT
    ) as server:
        yield Served(server.base_url, keys, server.proc, server.log)
    assert server.proc.returncode is not None
