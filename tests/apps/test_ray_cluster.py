"""A simulation that joins an existing Ray cluster instead of starting its own.

Flower 1.41's simulation config has no address field; ``RAY_ADDRESS`` in the
SuperLink's environment makes its Ray backend's ``ray.init()`` connect to a running
cluster (and then Ray's CPU count must not be passed, which fedobj never does). The
test starts a Ray head on 127.0.0.1 (its own temp dir, 2 CPUs, ``--block`` so that
stopping that one process stops the head), runs a short scenario through
``simulations/run_scenario.py`` with ``RAY_ADDRESS`` set, and checks that the run's
Ray driver registered with that head (its log lands in the head's session folder;
a simulation starting its own Ray would log under /tmp/ray instead).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedobj.superlink import descendants
from tests.conftest import FIXTURE_FMNIST, ROOT, free_port

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).with_name("ray"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_scenario_joins_an_existing_ray_cluster(tmp_path: Path) -> None:
    port = free_port()
    temp = Path("/tmp") / f"ray-fedobj-{port}"  # Ray wants a short socket path
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        + [f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
        + ["--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not list(temp.glob("session_*/logs/gcs_server.out")):
            assert head.poll() is None, head.stdout.read() if head.stdout else ""
            assert time.monotonic() < deadline, "Ray head did not start"
            time.sleep(0.5)
        tree = {head.pid} | descendants(head.pid)
        env = {
            **os.environ,
            "RAY_ADDRESS": f"127.0.0.1:{port}",
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
        }
        done = subprocess.run(
            [sys.executable, str(ROOT / "simulations" / "run_scenario.py")]
            + ["clients-100", "--nodes", "12", "--rounds", "2"]
            + ["--out", str(tmp_path), "--ports", str(free_port()), str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert '"summary": true' in done.stdout
        assert (tmp_path / "clients-100.parquet").exists()
        # the run's Ray driver registered with *this* head
        drivers = list(temp.glob("session_*/logs/python-core-driver-*.log"))
        assert drivers, sorted(p.name for p in temp.glob("session_*/logs/*"))[:40]
    finally:
        tree |= descendants(head.pid)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in tree:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        left = [p for p in tree if _alive(p)]
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"
