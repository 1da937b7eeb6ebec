"""Deployment: a real SuperLink and two SuperNodes, each over its own image folder.

No simulation: the SuperNodes connect over the network (127.0.0.1), find their data
through the `data-dir` node config (PNG/JPEG folders written from the fixture, with a
corrupt file and a stray text file that must be skipped, not crash the round), and
`flwr run` submits to the SuperLink through a named connection in FLWR_HOME.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedobj.superlink import _alive, descendants
from tests.conftest import FIXTURE_FMNIST, ROOT, free_port, write_image_folder

pytestmark = pytest.mark.deployment
BIN = Path(sys.executable).parent


def _env(home: Path, outputs: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FEDOBJ_OUTPUTS_DIR=str(outputs),
        FEDOBJ_FASHION_MNIST_DIR=str(FIXTURE_FMNIST),
    )
    return env


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5):
            return True
    except OSError:
        return False


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_superlink(
    home: Path, port: int, control: int, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """A deployed (not simulated) ``flower-superlink`` on 127.0.0.1, insecure."""
    return _start(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--control-api-address",
            f"127.0.0.1:{control}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(home / "state.db"),
        ],
        env,
        log,
    )


def wait_healthy(port: int, log: Path, timeout_s: float = 60) -> None:
    """Until the SuperLink's health endpoint answers (fails with its log)."""
    deadline = time.monotonic() + timeout_s
    while not _healthy(port):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def deploy_run(
    env: dict[str, str], run_config: str
) -> subprocess.CompletedProcess[str]:
    """``flwr run . deploy`` against the SuperLink named ``deploy`` in Flower's
    config of ``env``'s FLWR_HOME."""
    return subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), "deploy", "--stream"]
        + ["--run-config", run_config],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    tree: set[int] = set()
    for p in procs:
        tree |= {p.pid} | descendants(p.pid)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    for pid in tree:
        if _alive(pid):
            os.kill(pid, 9)
    deadline = time.monotonic() + 5  # SIGKILL is not instant: wait for the exits
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.1)
    return sorted(p for p in tree if _alive(p))


def test_superlink_and_two_supernodes_train_from_image_folders(tmp_path: Path) -> None:
    home, outputs = tmp_path / "flwr", tmp_path / "outputs"
    home.mkdir()
    env = _env(home, outputs)
    port, control = free_port(), free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    devices = []
    for i in range(2):
        root = write_image_folder(tmp_path / f"device{i}", per_class=40, offset=40 * i)
        (root / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        (root / "notes.txt").write_text("a file outside any category folder")
        devices.append(root)

    procs = [start_superlink(home, port, control, env, tmp_path / "superlink.log")]
    try:
        wait_healthy(port, tmp_path / "superlink.log")
        for i, root in enumerate(devices):
            node_config = f"data-dir='{root}' cache-dir='{tmp_path / f'cache{i}'}'"
            procs.append(
                _start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        node_config,
                    ],
                    env,
                    tmp_path / f"supernode{i}.log",
                )
            )
        run = deploy_run(
            env, "num-server-rounds=2 min-nodes=2 fraction-evaluate=1.0 local-epochs=2"
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        assert "round 2/2: 2/2 nodes replied" in log, log[-4000:]
        # each device decoded its folder once and cached it on its own disk
        assert len(list((tmp_path / "cache0").glob("imagefolder-*.json"))) == 1
        assert len(list((tmp_path / "cache0").glob("imagefolder-*.npy"))) == 2
        summary = (outputs / "latest" / "summary.json").read_text()
        assert '"rounds": 2' in summary
    finally:
        left = _stop_all(procs)
    assert not left, f"processes left running: {left}"
