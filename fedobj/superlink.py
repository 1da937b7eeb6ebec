"""Start and stop a local simulation SuperLink that fedobj owns.

``flwr run .`` lazily starts a detached SuperLink that keeps the environment of
whoever started it and outlives the run. We start it ourselves instead, so that its
environment is right (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: otherwise
every run builds a fresh environment and downloads torch), its pid is known, and
``fedobj superlink stop`` (``make stop``) can end it and everything it started: it
runs in its own session, so one signal to its process group reaches the ServerApp,
the simulation and Ray's workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HTTP_PORT = 39191
DEFAULT_CONTROL_PORT = 39193


@dataclass
class LocalSuperLink:
    """A simulation SuperLink on 127.0.0.1, its state and logs under ``flwr_home``."""

    flwr_home: Path
    http_port: int = DEFAULT_HTTP_PORT
    control_port: int = DEFAULT_CONTROL_PORT
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pid_file(self) -> Path:
        return self.flwr_home / f"superlink-{self.http_port}.pid"

    @property
    def log_file(self) -> Path:
        return self.flwr_home / f"superlink-{self.http_port}.log"

    def cli_env(self) -> dict[str, str]:
        """Environment for ``flwr run`` so that it finds this SuperLink by port."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update({
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        })
        return env

    def is_healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http_port}/health"
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout_s: float = 60.0) -> int:
        """Start (or reuse a healthy one we started) and return its pid."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        pid = self._read_pid()
        if pid is not None and _alive(pid) and self.is_healthy():
            return pid
        if self.is_healthy():
            raise RuntimeError(
                f"port {self.http_port} already serves a SuperLink fedobj did not start; "
                "stop it or choose other ports (SUPERLINK_PORT / CONTROL_PORT)"
            )
        exe = Path(sys.executable).with_name("flower-superlink")
        cmd = [
            str(exe) if exe.exists() else "flower-superlink",
            "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{self.control_port}",
            "--host", "127.0.0.1", "--port", str(self.http_port),
            "--database", str(self.flwr_home / f"superlink-{self.http_port}.db"),
        ]
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                cmd, env=self.cli_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise RuntimeError(
                    f"flower-superlink exited with code {proc.returncode}; "
                    f"see {self.log_file}"
                )
            if self.is_healthy():
                return proc.pid
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SuperLink not healthy after {timeout_s:.0f} s; see {self.log_file}")

    def stop(self, grace_s: float = 10.0) -> bool:
        """End the SuperLink's whole process group; True if something was running."""
        pid = self._read_pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None or not _alive(pid):
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if not _group_alive(pid):
                    return True
                time.sleep(0.1)
        return True

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True


def _group_alive(pgid: int) -> bool:
    """True while any live process is in process group ``pgid`` (Linux /proc scan)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
