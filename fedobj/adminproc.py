"""Start and stop a real ``fedobj admin serve`` process (tests, load benchmark).

One place that knows the command line, waits for ``/health`` (HTTP or HTTPS) and
always stops the process (SIGTERM, SIGKILL after a grace period), so a test and
the load benchmark measure the same server a user starts.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FEDOBJ = str(Path(sys.executable).with_name("fedobj"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AdminProcess:
    """A running ``fedobj admin serve``: where it answers and its log."""

    base_url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {self.proc.returncode}:\n{self.tail()}"
            )


def _healthy(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def serve_admin(
    outputs: Path,
    db_url: str,
    *,
    registry: Path | None = None,
    extra: Sequence[str] = (),
    tls_ca: Path | None = None,
    cwd: Path | None = None,
    start_timeout_s: float = 60,
    stop_grace_s: float = 20,
) -> Iterator[AdminProcess]:
    """``fedobj admin serve`` on a free 127.0.0.1 port until the block ends.

    Rate limiting is off (callers measure or test the routes, not the limiter)
    and the API secret comes from ``outputs`` (the keys were made there), so
    ``FEDOBJ_API_SECRET`` is dropped from the environment.
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
            cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    server = AdminProcess(
        f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}", proc, log
    )
    context = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(f"{server.base_url}/health", context):
            server.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{server.tail()}")
            time.sleep(0.3)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
