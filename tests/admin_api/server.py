"""Start and stop a real ``fedobj admin serve`` process for tests."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port

FEDOBJ = str(Path(sys.executable).with_name("fedobj"))


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
    """``fedobj admin serve`` on a free 127.0.0.1 port until the block ends.

    Waits for ``/health``; on exit sends SIGTERM, then SIGKILL after 20 s, and
    checks the process is gone.
    """
    port = free_port()
    log = outputs / f"server-{port}.log"
    env = {**os.environ, "FEDOBJ_OUTPUTS_DIR": str(outputs)}
    env.pop("FEDOBJ_API_SECRET", None)
    cmd = [
        FEDOBJ,
        "admin",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        db_url,
        "--rate-limit",
        "0",
        "--log-level",
        "warning",
        *(["--registry", str(registry)] if registry else []),
        *extra,
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    base = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (
                    httpx.get(f"{base}/health", timeout=2, verify=verify).status_code
                    == 200
                ):
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not come up:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield Served(base, keys, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.returncode is not None
