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

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedobj.appstage import stage_app

DEFAULT_HTTP_PORT = 39191
DEFAULT_CONTROL_PORT = 39193
MARKER_ENV = "FEDOBJ_SUPERLINK"
NO_RUNTIME_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
"""``1``: Flower's SuperLink runs no ``uv sync`` of each run's dependencies (6 GB
under ``$FLWR_HOME/runtime-envs/<run>`` for this project, torch included: the venv
that starts it has them already). Every launcher of ours sets it to ``1`` unless
the user's environment gives it a value."""


def no_runtime_install(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` for a process that may start a SuperLink or SuperNode:
    :data:`NO_RUNTIME_INSTALL` is ``1`` unless ``env`` gives it a value (a user
    who wants Flower's per-run environments keeps them)."""
    copy = dict(env)
    copy[NO_RUNTIME_INSTALL] = copy.get(NO_RUNTIME_INSTALL) or "1"
    return copy


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

    @property
    def marker(self) -> str:
        """Set in the environment of everything this SuperLink starts, which every
        child inherits — Ray's agents too, whose parent may die before them — so
        :meth:`stop` finds them even when they are no longer in its tree."""
        return f"{self.flwr_home.resolve()}:{self.http_port}"

    def cli_env(self) -> dict[str, str]:
        """Environment for ``flwr run`` so that it finds this SuperLink by port."""
        env = dict(os.environ)
        env.update(self.extra_env)
        # Flower's processes start one another by name: the venv's bin must be on PATH.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
                "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                MARKER_ENV: self.marker,
            }
        )
        return no_runtime_install(env)

    def run_command(
        self,
        app_dir: str | Path,
        num_supernodes: int,
        run_config: str,
        cpus_per_node: int = 1,
    ) -> list[str]:
        """``flwr run APP --stream`` in simulation with ``num_supernodes`` nodes.

        Run it with :meth:`cli_env` so that ``flwr`` finds this SuperLink by port.
        ``cpus_per_node=1`` lets two nodes train at once on two cores (Flower's
        default of 2 runs one at a time). The app's bundle is staged in a
        directory of its own under ``flwr_home`` first (:mod:`fedobj.appstage`:
        ``flwr`` would otherwise walk the project's ``.venv``, 4.5 s a run).
        """
        flwr = str(Path(sys.executable).with_name("flwr"))
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        app_dir = stage_app(
            Path(app_dir), Path(tempfile.mkdtemp(prefix="app-", dir=self.flwr_home))
        )
        federation = f"num-supernodes={num_supernodes} "
        federation += f"client-resources-num-cpus={cpus_per_node}"
        return [
            flwr,
            "run",
            str(app_dir),
            "--stream",
            "--federation-config",
            federation,
            "--run-config",
            run_config,
        ]

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
                f"port {self.http_port} already serves a SuperLink fedobj did not "
                "start; "
                "stop it or choose other ports (SUPERLINK_PORT / CONTROL_PORT)"
            )
        exe = Path(sys.executable).with_name("flower-superlink")
        cmd = [
            str(exe) if exe.exists() else "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
            "--database",
            str(self.flwr_home / f"superlink-{self.http_port}.db"),
        ]
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=self.cli_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
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
        raise RuntimeError(
            f"SuperLink not healthy after {timeout_s:.0f} s; see {self.log_file}"
        )

    def stop(self, grace_s: float = 10.0) -> bool:
        """End the SuperLink and every process it started; True if any was running.

        Flower starts SuperExec, the ServerApp and the simulation in sessions of their
        own, so a process-group signal would miss them: the whole process tree is
        collected first (Ray's workers are re-parented once their parent dies), the
        SuperLink is asked to shut down, and whatever remains is terminated. After a
        crash (the simulation killed, the SuperLink gone) Ray's agents are in no
        tree of ours: they are found by the environment marker they inherited.
        """
        pid = self._read_pid()
        self.pid_file.unlink(missing_ok=True)
        me = os.getpid()
        tree = {p for p in marked_processes(self.marker) if p != me}
        if pid is not None and _alive(pid):
            tree |= {pid} | descendants(pid)
            _signal_all({pid}, signal.SIGTERM)
            _wait_gone({pid}, grace_s)
        if not tree:
            return False
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for p in list(tree):
                tree |= descendants(p)
            tree |= {p for p in marked_processes(self.marker) if p != me}
            tree.discard(me)
            alive = {p for p in tree if _alive(p)}
            if not alive:
                break
            _signal_all(alive, sig)
            _wait_gone(alive, wait)
        return True

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def marked_processes(marker: str) -> set[int]:
    """Live processes whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode() + b"\0"
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            data = environ.read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in data + b"\0" and _alive(int(environ.parent.name)):
            found.add(int(environ.parent.name))
    return found


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


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` in the process tree (Linux /proc scan)."""
    children = _children_map()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _wait_gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
