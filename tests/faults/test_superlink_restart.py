"""The SuperLink killed and restarted during a deployment run: the SuperNodes
reconnect, the run is reported failed, and ``resume=true`` completes it.

A real insecure ``flower-superlink --isolation subprocess --database FILE`` and two
``flower-supernode`` processes over image folders, on 127.0.0.1. ``fedobj run``
starts a 4-round run through the ``deploy`` connection; once round 1's version is
in the catalog and round 2 has begun, the SuperLink and everything below it
(SuperExec, the ServerApp) are SIGKILLed — a power cut on the server — and the
SuperLink is started again on the same ports with the same database.

Flower 1.41 facts this rests on: ``flwr run --stream`` loses its log stream and
returns without the run's status, which ``fedobj run`` reads afterwards
(``fedobj.launch``); the restarted SuperLink restores the run from its database and
marks it ``finished:failed`` ("No heartbeat received from the task") 60 s after
the ServerApp's last heartbeat; the SuperNodes keep their node ids (restored from
the database too) and go on polling — one whose poll fell into the outage logs
"Connection attempt failed, retrying", one whose did not logs nothing at all, so
that they are back is shown by the replies they push in the resumed run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest

from fedobj.adminproc import FEDOBJ
from fedobj.catalog import SyncCatalog
from fedobj.superlink import _alive, descendants
from tests.apps.test_deployment import BIN, _env, _start, wait_healthy
from tests.conftest import ROOT, free_port, write_image_folder

pytestmark = [pytest.mark.deployment, pytest.mark.faults]

CONNECTION = "deploy"
# tiny rounds: a ClientApp process per message dominates anyway; 4 rounds so that
# round 2 is under way when the SuperLink dies and 2 are left for the resume
RUN = "num-server-rounds=4 min-nodes=2 central-eval=false local-epochs=1"


def wait_until(check: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Stop processes and every process below them; the pids still alive after.

    The tree is collected first: a SuperNode's SuperExec runs in a session of its
    own and outlives its parent. SIGTERM, then SIGKILL, then wait until the kernel
    has really ended them (a SIGKILLed process is not gone the instant after).
    """
    tree: set[int] = set()
    for p in procs:
        if p.poll() is None:
            tree |= {p.pid} | descendants(p.pid)
    for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        alive = {p for p in tree if _alive(p)}
        for pid in alive:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            for p in procs:
                p.poll()  # reap our own children
            time.sleep(0.2)
    for p in procs:
        with suppress(subprocess.TimeoutExpired):
            p.wait(timeout=1)
    return sorted(p for p in tree if _alive(p))


class Deployment:
    """One SuperLink (restartable on its ports and database) and its SuperNodes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home, self.outputs = tmp / "flwr", tmp / "outputs"
        self.home.mkdir()
        self.env = _env(self.home, self.outputs)
        self.port, self.control = free_port(), free_port()
        self.state = self.home / "superlink-state.db"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.superlink: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.supernode_logs: list[Path] = []

    def start_superlink(self) -> None:
        self.starts += 1
        log = self.tmp / f"superlink-{self.starts}.log"
        self.superlink = _start(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--control-api-address",
                f"127.0.0.1:{self.control}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.state),
            ],
            self.env,
            log,
        )
        self.procs.append(self.superlink)
        wait_healthy(self.port, log)

    def kill_superlink(self) -> set[int]:
        """SIGKILL the SuperLink and its whole tree: SuperExec and the ServerApp
        run in sessions of their own, so a group signal would miss them."""
        assert self.superlink is not None
        tree = {self.superlink.pid} | descendants(self.superlink.pid)
        for pid in tree:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.superlink.wait(timeout=10)
        wait_until(lambda: not any(_alive(p) for p in tree), 10, "the tree to die")
        return tree

    def add_supernode(self, data_dir: Path) -> None:
        i = len(self.supernode_logs)
        self.supernode_logs.append(self.tmp / f"supernode{i}.log")
        node_config = f"data-dir='{data_dir}' cache-dir='{self.tmp / f'cache{i}'}'"
        self.procs.append(
            _start(
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ],
                self.env,
                self.supernode_logs[i],
            )
        )

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def nodes(self) -> dict[int, str]:
        """The SuperLink's view of its SuperNodes: node id -> status."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if out.returncode != 0:
            return {}
        return {n["node-id"]: n["status"] for n in json.loads(out.stdout)["nodes"]}

    def online(self) -> set[int]:
        return {n for n, s in self.nodes().items() if s == "online"}

    def run_status(self, run_id: str) -> str:
        out = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        runs = json.loads(out.stdout).get("runs", []) if out.returncode == 0 else []
        return str(runs[0]["status"]) if runs else ""

    def fedobj_run(self, run_config: str, name: str) -> FedobjRun:
        return FedobjRun(self, run_config, self.tmp / name)


class FedobjRun:
    """``fedobj run`` in the background, its output in files (a pipe nobody reads
    would fill up and stall it)."""

    def __init__(self, dep: Deployment, run_config: str, stem: Path) -> None:
        self.out, self.err = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [FEDOBJ, "run", "--app", str(ROOT), "--connection", CONNECTION]
                + ["--outputs", str(dep.outputs), "--run-config", run_config],
                cwd=ROOT,
                env={**dep.env, "COLUMNS": "200"},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    @property
    def log(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(
            errors="replace"
        )

    def run_id(self) -> str | None:
        for line in self.out.read_text(errors="replace").splitlines():
            if "Successfully started run" in line:
                return line.split()[-1]
        return None

    def finish(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            tail = self.log[-4000:]
            raise AssertionError(f"fedobj run still going:\n{tail}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def test_a_superlink_killed_mid_run_restarts_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    dep = Deployment(tmp_path)
    db = tmp_path / "catalog.db"
    config = f'{RUN} database-url="sqlite:///{db}" outputs-dir="{dep.outputs}"'
    catalog = SyncCatalog(db)
    runs: list[FedobjRun] = []
    try:
        dep.start_superlink()
        for i in range(2):
            dep.add_supernode(
                write_image_folder(tmp_path / f"device{i}", per_class=10, offset=10 * i)
            )
        wait_until(lambda: len(dep.online()) == 2, 60, "2 SuperNodes online")
        nodes_before = dep.online()

        first = dep.fedobj_run(config, "first")
        runs.append(first)

        def round_2_begun() -> bool:
            assert first.proc.poll() is None, first.log[-4000:]
            run_id = first.run_id()
            if run_id is None or not db.exists():
                return False
            try:
                versions = catalog.list_versions(run_id=run_id)
                rounds = {r.round for r in catalog.rounds(run_id)}
            except Exception:  # the ServerApp is still creating the catalog
                return False
            return [v.round for v in versions] == [1] and 2 in rounds

        wait_until(round_2_begun, 420, "round 1's version and round 2's start")
        run_id = first.run_id()
        assert run_id is not None
        killed = dep.kill_superlink()
        killed_at = time.monotonic()
        assert len(killed) >= 3, killed  # SuperLink, SuperExec, ServerApp at least

        dep.start_superlink()  # same ports, same --database
        assert first.finish(180) == 1, first.log[-4000:]
        first_s = time.monotonic() - killed_at
        errors = [ln for ln in first.err.read_text().splitlines() if "error:" in ln]
        assert len(errors) == 1, first.log[-4000:]
        # Flower's own words for a ServerApp whose heartbeat stopped
        assert f"run {run_id} failed: No heartbeat" in errors[0], errors
        assert "final central accuracy" not in first.out.read_text()

        # the restored SuperLink knows the run, and reports it failed
        wait_until(
            lambda: dep.run_status(run_id) == "finished:failed",
            180,
            f"run {run_id} reported finished:failed",
        )
        # the restored SuperLink lists both SuperNodes, under their ids (its
        # database says so: that they are really back, the resumed run shows)
        wait_until(lambda: len(dep.online()) == 2, 120, "2 SuperNodes online again")

        second = dep.fedobj_run(
            f"{config} resume=true allow-concurrent-runs=true", "resumed"
        )
        runs.append(second)
        assert second.finish(420) == 0, second.log[-4000:]
        resumed_id = second.run_id()
        assert dep.run_status(str(resumed_id)) == "finished:completed"
        versions = sorted(catalog.list_versions(), key=lambda v: v.round)
        cut = catalog.get_run(run_id)
        resumed_rounds = {
            r.round: (r.status, r.nodes_replied)
            for r in catalog.rounds(str(resumed_id))
        }
        cut_rounds = {r.round: r.status for r in catalog.rounds(run_id)}
        lease = catalog.lease()
        nodes_after = dep.nodes()
        relinked = (tmp_path / f"superlink-{dep.starts}.log").read_text()
    finally:
        for run in runs:
            run.stop()
        left = stop_all(dep.procs)
    assert not left, f"processes left running: {left}"

    print(f"fedobj run exited {first_s:.0f} s after the kill: {errors[0]}")
    # the same two SuperNodes, no new registration, and both delivered replies
    # to the restarted SuperLink
    assert set(nodes_after) == nodes_before, nodes_after
    for node in nodes_before:
        assert f"Push replies from node_id={node}" in relinked, node
    # every round number once, one unbroken chain across the two runs
    assert [v.round for v in versions] == [1, 2, 3, 4]
    assert [v.run_id for v in versions] == [run_id] + [str(resumed_id)] * 3
    for parent, child in zip(versions, versions[1:]):
        assert child.parent_id == parent.id
    assert versions[-1].is_current
    # the cut run: closed as failed with its open round; the resume did 2..4
    assert cut.status == "failed" and cut.error, cut
    assert cut_rounds == {1: "completed", 2: "failed"}, cut_rounds
    # ... with both reconnected SuperNodes replying in every round
    assert resumed_rounds == {n: ("completed", 2) for n in (2, 3, 4)}, resumed_rounds
    assert lease.holder is None
