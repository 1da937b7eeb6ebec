"""After a crash, stopping the SuperLink leaves no Flower or Ray process behind:
Ray's DashboardAgent and RuntimeEnvAgent outlive a SIGKILLed simulation and are
re-parented away from the SuperLink's tree; `stop` finds them by the environment
marker they inherited."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedobj.superlink import LocalSuperLink, _alive, descendants, marked_processes
from tests.conftest import FIXTURE_FMNIST, ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_stop_after_a_killed_simulation_leaves_no_process(tmp_path: Path) -> None:
    link = LocalSuperLink(
        tmp_path / "flwr",
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(tmp_path / "outputs"),
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
        },
    )
    link.start()
    run = subprocess.Popen(
        link.run_command(ROOT, 2, "num-server-rounds=50 min-nodes=2"),
        env=link.cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        agents: list[int] = []
        while time.monotonic() < deadline and not agents:
            time.sleep(0.5)
            agents = [
                p
                for p in marked_processes(link.marker)
                if "agent" in cmdline(p) and "ray" in cmdline(p)
            ]
        assert agents, "Ray's agents never started"
        sims = [
            p
            for p in descendants(link._read_pid() or 0)
            if "flwr-simulation" in cmdline(p)
        ]
        assert sims
        for pid in sims:
            os.kill(pid, signal.SIGKILL)
        time.sleep(3)
        assert link.stop()
        left = [(p, cmdline(p)[:120]) for p in marked_processes(link.marker)]
        assert not left, f"left running after stop: {left}"
        assert not any(_alive(p) for p in agents)
    finally:
        run.kill()
        run.wait()
        link.stop()
