"""Deployment with TLS and authenticated SuperNodes, end to end on 127.0.0.1.

Keys and certificates come from ``fedobj deploy keys`` (the CLI, as an operator runs
it). The SuperLink serves TLS with ``--enable-supernode-auth``; ``flwr`` reaches its
Control API through a connection with ``root-certificates``; every SuperNode's
public key is registered with ``flwr supernode register`` before it starts with its
private key. Then the refusals: a key never registered, a key removed with
``flwr supernode unregister`` (the running node is cut off and cannot come back),
and authentication without TLS on either side.

Flower 1.41 facts these tests pin down (read in ``flwr/supernode/
fleet_http_connection.py`` and ``flwr/superlink/cli/flower_superlink.py``): a
refused SuperNode exits with status 1 after logging ``Exit Code: 305`` and the
SuperLink's reason (``[code: 2004] Failed to activate SuperNode.``); a registered
node that is unregistered gets HTTP 401 on its next Fleet call and shuts itself
down; ``--insecure --enable-supernode-auth`` exits 1 with ``Exit Code: 104``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedobj.deploykit import DeployKeyFiles, planned_files, write_deploy_keys
from fedobj.superlink import _alive
from tests.apps.test_deployment import BIN, _env, _start, _stop_all, deploy_run
from tests.conftest import ROOT, free_port, write_image_folder

pytestmark = pytest.mark.deployment
MOBILE = ROOT / "mobile"
# A refused SuperNode gives up at once (HTTP 412 is not retried); allow for imports
# on a busy 2-core machine.
REFUSAL_TIMEOUT_S = 90.0


@dataclass
class TlsLink:
    """A TLS SuperLink with node authentication, and what talks to it."""

    home: Path
    port: int
    keys: DeployKeyFiles
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    logs: Path

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``flwr ARGS`` with this link's FLWR_HOME (connection ``deploy``)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def register(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub deploy``; the node id it was given."""
        done = self.flwr(
            "supernode", "register", str(public_key), "deploy", "--format", "json"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return int(json.loads(done.stdout)["node-id"])

    def node_status(self) -> dict[int, str]:
        """Node id -> status (registered / online / offline / unregistered)."""
        done = self.flwr("supernode", "ls", "deploy", "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        return {
            int(n["node-id"]): n["status"] for n in json.loads(done.stdout)["nodes"]
        }

    def supernode_cmd(
        self, private_key: Path, node_config: str = "", ca: Path | None = None
    ) -> list[str]:
        """``flower-supernode`` with TLS (our CA unless ``ca``) and ``private_key``."""
        cmd = [
            str(BIN / "flower-supernode"),
            "--root-certificates",
            str(ca or self.keys.ca_cert),
            "--auth-supernode-private-key",
            str(private_key),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
        ]
        return cmd + (["--node-config", node_config] if node_config else [])

    def start_supernode(
        self,
        private_key: Path,
        name: str,
        node_config: str = "",
        ca: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start one (log ``<name>.log``); it is stopped with the link."""
        proc = _start(
            self.supernode_cmd(private_key, node_config, ca),
            self.env,
            self.logs / f"{name}.log",
        )
        self.procs.append(proc)
        return proc


def write_tls_connection(home: Path, port: int, ca_cert: Path) -> None:
    """``$FLWR_HOME/config.toml`` with a TLS connection named ``deploy`` (default).

    The name matches ``deploy_run`` of the insecure deployment test.
    """
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


def make_keys(out: Path, nodes: int, env: dict[str, str]) -> DeployKeyFiles:
    """Keys through the real ``fedobj deploy keys`` command."""
    done = subprocess.run(
        [str(BIN / "fedobj"), "deploy", "keys", "--out", str(out)]
        + ["--nodes", str(nodes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return planned_files(out.resolve(), nodes)


def start_tls_superlink(
    home: Path, port: int, keys: DeployKeyFiles, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """``flower-superlink`` on 127.0.0.1 with TLS and SuperNode authentication."""
    return _start(
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(keys.ca_cert),
            "--ssl-certfile",
            str(keys.server_cert),
            "--ssl-keyfile",
            str(keys.server_key),
            "--enable-supernode-auth",
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


def wait_healthy_tls(
    port: int,
    ca_cert: Path,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 60,
) -> None:
    """Until ``https://127.0.0.1:PORT/health`` answers, verified against the CA."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            url = f"https://127.0.0.1:{port}/health"
            with urllib.request.urlopen(url, timeout=0.5, context=context):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def wait_exit(
    proc: subprocess.Popen[bytes], timeout_s: float = REFUSAL_TIMEOUT_S
) -> int:
    """The process's exit status; fails if it is still running after ``timeout_s``."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {proc.args!r} still running after {timeout_s:.0f} s")


@pytest.fixture
def tls_link(tmp_path: Path) -> Iterator[TlsLink]:
    """Keys, a TLS SuperLink with node auth, and a ``deploy`` connection; every
    process started through it is stopped afterwards (and checked gone)."""
    home, outputs, logs = tmp_path / "flwr", tmp_path / "outputs", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    env = _env(home, outputs)
    keys = make_keys(tmp_path / "keys", 3, env)
    port = free_port()
    write_tls_connection(home, port, keys.ca_cert)
    superlink = start_tls_superlink(home, port, keys, env, logs / "superlink.log")
    link = TlsLink(home, port, keys, env, [superlink], logs)
    try:
        wait_healthy_tls(port, keys.ca_cert, superlink, logs / "superlink.log")
        yield link
    finally:
        left = _stop_all(link.procs)
    assert not left, f"processes left running: {left}"


def test_three_authenticated_supernodes_train_over_tls(
    tls_link: TlsLink, tmp_path: Path
) -> None:
    link = tls_link
    node_ids = [link.register(node.public_key) for node in link.keys.nodes[:3]]
    assert set(link.node_status()) == set(node_ids)
    for i, node in enumerate(link.keys.nodes[:3]):
        root = write_image_folder(tmp_path / f"device{i}", per_class=16, offset=16 * i)
        cache = tmp_path / f"cache{i}"
        if i < 2:
            config = f"data-dir='{root}' cache-dir='{cache}'"
            link.start_supernode(node.private_key, f"supernode{i}", config)
        else:  # the edge launcher passes TLS and the auth key through
            launcher = _start(
                [
                    sys.executable,
                    str(MOBILE / "run_supernode.py"),
                    "--superlink",
                    f"127.0.0.1:{link.port}",
                    "--root-certificates",
                    str(link.keys.ca_cert),
                    "--auth-key",
                    str(node.private_key),
                    "--data-dir",
                    str(root),
                    "--cache-dir",
                    str(cache),
                    "--device-id",
                    "board-2",
                    "--port",
                    str(free_port()),
                ],
                link.env,
                link.logs / f"supernode{i}.log",
            )
            link.procs.append(launcher)

    run = deploy_run(
        link.env,
        "num-server-rounds=2 min-nodes=3 model='cnn' batch-size=16",
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "round 2/2: 3/3 nodes replied" in log, log[-4000:]
    outputs = Path(link.env["FEDOBJ_OUTPUTS_DIR"]) / "latest"
    assert json.loads((outputs / "summary.json").read_text())["rounds"] == 2
    rows = pq.read_table(outputs / "metrics.parquet").to_pylist()
    trained = {int(r["node_id"]) for r in rows if r["kind"] == "node-train"}
    assert trained == set(node_ids), "exactly the registered SuperNodes trained"
    assert all(p.poll() is None for p in link.procs), "a SuperNode or the link died"


def test_unregistered_and_removed_keys_are_refused(tls_link: TlsLink) -> None:
    link = tls_link
    never, removed = link.keys.nodes[0], link.keys.nodes[1]

    # (a) a key that was never registered: the SuperLink refuses to activate it
    stranger = link.start_supernode(never.private_key, "stranger")
    assert wait_exit(stranger) == 1
    stranger_log = (link.logs / "stranger.log").read_text()
    assert "Exit Code: 305" in stranger_log, stranger_log
    assert "Failed to activate SuperNode" in stranger_log, stranger_log
    superlink_log = (link.logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log

    # a CA the SuperLink's certificate does not chain to: TLS fails, no retry loop
    other = write_deploy_keys(link.logs.parent / "other-ca", 1)
    impostor = link.start_supernode(never.private_key, "impostor", ca=other.ca_cert)
    assert wait_exit(impostor) == 1
    impostor_log = (link.logs / "impostor.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in impostor_log, impostor_log

    # (b) registered and online, then removed: cut off, and refused when it retries
    node_id = link.register(removed.public_key)
    member = link.start_supernode(removed.private_key, "member")
    deadline = time.monotonic() + REFUSAL_TIMEOUT_S
    while link.node_status().get(node_id) != "online":
        assert member.poll() is None, (link.logs / "member.log").read_text()
        assert time.monotonic() < deadline, "registered SuperNode never came online"
        time.sleep(1)
    done = link.flwr("supernode", "unregister", str(node_id), "deploy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert link.node_status()[node_id] == "unregistered"
    wait_exit(member)  # its next Fleet call gets HTTP 401 and it shuts down
    refused = r'"POST /v1/fleet/[a-z-]+ HTTP/1.1" 401'
    assert re.search(refused, (link.logs / "superlink.log").read_text())

    again = link.start_supernode(removed.private_key, "member-again")
    assert wait_exit(again) == 1
    again_log = (link.logs / "member-again.log").read_text()
    assert "Failed to activate SuperNode" in again_log, again_log


def test_auth_without_tls_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    home = tmp_path / "flwr"
    home.mkdir()
    env = _env(home, tmp_path / "outputs")
    keys = make_keys(tmp_path / "keys", 1, env)

    superlink = subprocess.run(
        [str(BIN / "flower-superlink"), "--insecure", "--enable-supernode-auth"]
        + ["--host", "127.0.0.1", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
    )
    out = superlink.stdout + superlink.stderr
    assert superlink.returncode == 1, out
    assert "Exit Code: 104" in out, out
    assert "`--enable-supernode-auth` flag requires encrypted TLS" in out, out

    # the SuperNode side refuses the same mistake before it dials anyone
    supernode = subprocess.run(
        [str(BIN / "flower-supernode"), "--insecure"]
        + ["--auth-supernode-private-key", str(keys.nodes[0].private_key)]
        + ["--superlink", f"127.0.0.1:{free_port()}", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
    )
    out = supernode.stdout + supernode.stderr
    assert supernode.returncode == 1, out
    assert "Exit Code: 303" in out, out
    assert "SuperNode authentication requires a secure TLS connection" in out, out


def _processes_mentioning(needles: list[str]) -> set[int]:
    """Live processes whose command line holds any of ``needles`` (a /proc scan)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        if any(n in text for n in needles) and _alive(pid):
            found.add(pid)
    return found


def test_run_local_script_deploys_and_stops_everything(tmp_path: Path) -> None:
    """conf/deploy/run_local.sh as a user runs it (one node, one round: its steps,
    not the training, are under test), then nothing of it is left running."""
    deploy = tmp_path / "deploy"
    port, node_port = free_port(), free_port()
    env = _env(tmp_path / "unused-home", tmp_path / "outputs")
    env.update(
        DEPLOY_DIR=str(deploy),
        NODES="1",
        SUPERLINK_PORT=str(port),
        SUPERNODE_PORT=str(node_port),
        RUN_CONFIG="num-server-rounds=1 min-nodes=1 model='cnn' batch-size=16",
    )
    log = tmp_path / "run_local.log"
    script = _start(["bash", str(ROOT / "conf" / "deploy" / "run_local.sh")], env, log)
    mine = [str(deploy), f"127.0.0.1:{port}", f"127.0.0.1:{node_port}"]
    try:
        status = script.wait(timeout=420)
    except subprocess.TimeoutExpired:
        script.terminate()  # the script's trap stops what it started
        status = script.wait(timeout=60)
    finally:
        deadline = time.monotonic() + 10  # reaped orphans may take a moment
        while (left := _processes_mentioning(mine)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # do not leak them into other tests; fail below
            os.kill(pid, signal.SIGKILL)
    out = log.read_text()
    assert status == 0, out[-4000:]
    assert out.count("registered successfully") == 1, out[-4000:]
    assert "round 1/1: 1/1 nodes replied" in out, out[-4000:]
    assert "stopping 3 processes" in out, out[-4000:]  # link, node, flwr run
    assert (deploy / "keys" / "supernode-1.key").stat().st_mode & 0o777 == 0o600
    assert (
        json.loads((tmp_path / "outputs" / "latest" / "summary.json").read_text())[
            "rounds"
        ]
        == 1
    )
    assert not left, f"processes left running: {left}"
