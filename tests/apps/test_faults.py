"""Faults in a real deployment: a SuperNode dies, the ServerApp is stopped, a
device cannot read its data.

Flower 1.41 facts these tests rest on (read in its source, seen here):

- A SuperNode heartbeats every ~20 s (``HEARTBEAT_DEFAULT_INTERVAL`` 30 s, minus
  the call timeout, times 0.8 +- 0.1); the SuperLink holds it online until
  2 x 30 s after the last one. A message to a node past that is answered by the
  SuperLink itself: an error reply with ``ErrorCode.NODE_UNAVAILABLE`` whose
  sender is ``SUPERLINK_NODE_ID`` (1). So a killed node costs a round 36-60 s,
  not ``round-timeout``; ``apps/exchange.py`` names the dead node in that reply.
- ``flwr stop`` marks the run finished:stopped and revokes the ServerApp's task
  token: its next SuperLink call fails (401) and the exception ends the
  ServerApp, whose ``finally`` releases the catalog lease; a stop seen first by
  its heartbeat raises SIGINT -> SystemExit, through the same ``finally``.

The unit tests at the end need no deployment: the exchange with the SuperLink's
own unavailability reply (built by Flower's link-state code), and the ClientApp
called in-process on data folders it cannot use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message,
)
from flwr.supercore.exit import exit_handler

from apps.client_app import app as client_app
from apps.exchange import ReplyFolder, exchange
from apps.records import model_to_arrays, put_model_context
from apps.run_lease import close_interrupted_rounds, held_lease
from fedobj import keys
from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import RoundRecord
from fedobj.classmap import ClassMap
from fedobj.model.factory import ModelArgs, build_model
from fedobj.superlink import descendants
from tests.apps.helpers import instruction, reply, set_task_identity
from tests.apps.test_deployment import (
    BIN,
    _env,
    _start,
    _stop_all,
    deploy_run,
    start_superlink,
    wait_healthy,
)
from tests.conftest import ROOT, free_port, write_image_folder

# tiny rounds: ClientApp start-up (a fresh process per message) dominates anyway
RUN = "central-eval=false local-epochs=1"


# ---------------------------------------------------------------- deployment


@dataclass
class Federation:
    """A SuperLink and its SuperNodes on 127.0.0.1, named ``deploy`` in FLWR_HOME."""

    tmp: Path
    env: dict[str, str]
    outputs: Path
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def supernodes(self) -> list[subprocess.Popen[bytes]]:
        return self.procs[1:]

    def add_supernode(
        self, data_dir: Path, device_id: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A SuperNode over ``data_dir``, caching in ``cache<i>``."""
        i = len(self.supernodes)
        node_config = f"data-dir='{data_dir}' cache-dir='{self.tmp / f'cache{i}'}'"
        if device_id is not None:
            node_config += f" device-id='{device_id}'"
        proc = _start(
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
            self.tmp / f"supernode{i}.log",
        )
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def node_status(self) -> dict[str, str]:
        """Flower's view of the SuperNodes: node id -> online / offline / ..."""
        out = self.flwr("supernode", "list", "deploy", "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return {n["node-id"]: n["status"] for n in json.loads(out.stdout)["nodes"]}

    def wait_online(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(s == "online" for s in self.node_status().values()) < n:
            assert time.monotonic() < deadline, f"fewer than {n} SuperNodes online"
            time.sleep(0.5)

    def catalog(self) -> SyncCatalog:
        """The catalog the ServerApp resolves (same env, same default path)."""
        return SyncCatalog(None, default_path=self.outputs / "catalog.db")


@contextmanager
def federation(tmp: Path) -> Iterator[Federation]:
    """Start a SuperLink; stop it and every SuperNode (and their children) after."""
    home, outputs = tmp / "flwr", tmp / "outputs"
    home.mkdir()
    env = _env(home, outputs)
    port, control = free_port(), free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    fed = Federation(tmp, env, outputs, port)
    fed.procs.append(start_superlink(home, port, control, env, tmp / "superlink.log"))
    try:
        wait_healthy(port, tmp / "superlink.log")
        yield fed
    finally:
        left = _stop_all(fed.procs)
        assert not left, f"processes left running: {left}"


class StreamedRun:
    """``flwr run . deploy --stream`` in the background, its output read as it
    comes, so a test can act at a point of the run (and every wait is bounded)."""

    def __init__(self, fed: Federation, run_config: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(ROOT), "deploy", "--stream"]
            + ["--run-config", run_config],
            env=fed.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self.cursor = 0  # wait_for looks after the last line it matched
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The next output line containing ``text``; fails with the log."""
        deadline = time.monotonic() + timeout_s
        with self._new:
            while True:
                for i in range(self.cursor, len(self.lines)):
                    if text in self.lines[i]:
                        self.cursor = i + 1
                        return self.lines[i]
                left = deadline - time.monotonic()
                assert left > 0 and self._reader.is_alive(), (
                    f"no {text!r} in the run's output:\n{self.log[-4000:]}"
                )
                self._new.wait(min(left, 1.0))

    def started(self) -> str:
        """The run id, once the SuperLink has accepted the run."""
        return self.wait_for("Successfully started run", 120).split()[-1]

    def finish(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"run still going:\n{self.log[-4000:]}") from None
        self._reader.join(timeout=10)
        return code


def kill_tree(proc: subprocess.Popen[bytes]) -> set[int]:
    """SIGKILL a process and everything below it (a SuperNode and its ClientApps):
    no goodbye to the SuperLink, as when a device loses power."""
    tree = {proc.pid} | descendants(proc.pid)
    for pid in tree:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return tree


def by_round(rows: list[RoundRecord]) -> dict[int, RoundRecord]:
    return {r.round: r for r in rows}


@pytest.mark.deployment
def test_a_supernode_killed_mid_round_is_counted_and_the_run_finishes(
    tmp_path: Path,
) -> None:
    with federation(tmp_path) as fed:
        for i in range(3):
            fed.add_supernode(
                write_image_folder(tmp_path / f"device{i}", per_class=10, offset=10 * i)
            )
        fed.wait_online(3)
        run = StreamedRun(fed, f"num-server-rounds=3 min-nodes=2 {RUN}")
        run_id = run.started()
        run.wait_for("round 1/3:", 300)
        run.wait_for("configure_train", 60)  # round 2's messages are going out
        time.sleep(1.0)
        victim = fed.supernodes[2]
        killed_at = time.monotonic()
        kill_tree(victim)
        line = run.wait_for("round 2/3:", 180)
        round2_s = time.monotonic() - killed_at
        assert run.finish(300) == 0, run.log[-4000:]
        log = run.log
        status = fed.node_status()
        catalog = fed.catalog()
        rounds = by_round(catalog.rounds(run_id))
        versions = catalog.list_versions(run_id=run_id)
        node_rounds = catalog.node_rounds(run_id)

    # Flower's heartbeat patience bounds the wait, not round-timeout (600 s)
    assert round2_s < 120, f"round 2 ended {round2_s:.0f} s after the kill"
    dead = [n for n, s in status.items() if s != "online"]
    assert len(dead) == 1, status
    # the round's log line and warning say who is missing and why
    assert "2/3 nodes replied, 1 rejected (1 unavailable)" in line, log[-4000:]
    assert f"reply from node {dead[0]} rejected" in log
    assert "Node Unavailable" in log
    # the catalog: sampled 3, replied 2, the third counted, named, with the reason
    r1, r2, r3 = rounds[1], rounds[2], rounds[3]
    assert (r1.nodes_sampled, r1.nodes_replied, r1.nodes_rejected) == (3, 3, 0)
    assert (r2.nodes_sampled, r2.nodes_replied, r2.nodes_rejected) == (3, 2, 1)
    assert (r3.nodes_sampled, r3.nodes_replied, r3.nodes_rejected) == (2, 2, 0)
    assert {r.status for r in rounds.values()} == {"completed"}
    failed = [n for n in node_rounds if n.error is not None]
    assert [(n.round, n.kind, n.node_id) for n in failed] == [(2, "train", dead[0])]
    assert "Node Unavailable" in str(failed[0].error)
    assert dead[0] not in {n.node_id for n in node_rounds if n.round == 3}
    # every round left its version
    assert sorted(v.round for v in versions) == [1, 2, 3]


@pytest.mark.deployment
def test_a_stopped_run_resumes_from_the_current_version(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        for i in range(2):
            fed.add_supernode(
                write_image_folder(tmp_path / f"device{i}", per_class=10, offset=10 * i)
            )
        fed.wait_online(2)
        first = StreamedRun(fed, f"num-server-rounds=3 min-nodes=2 {RUN}")
        stopped_id = first.started()
        first.wait_for("round 1/3:", 300)  # version v0001 is registered
        catalog = fed.catalog()
        deadline = time.monotonic() + 60
        while 2 not in by_round(catalog.rounds(stopped_id)):  # round 2 under way
            assert time.monotonic() < deadline, first.log[-4000:]
            time.sleep(0.2)
        stop = fed.flwr("stop", stopped_id, "deploy")
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout
        assert first.finish(60) == 0, first.log[-4000:]
        # the ServerApp ends (Flower revokes its token) and gives the lease back
        deadline = time.monotonic() + 60
        while (alive := _serverapps(fed)) or catalog.lease().holder is not None:
            assert time.monotonic() < deadline, (
                f"lease: {catalog.lease()}; ServerApp processes: {alive}; "
                + first.log[-3000:]
            )
            time.sleep(0.5)
        cut = by_round(catalog.rounds(stopped_id))

        resumed = deploy_run(
            fed.env, f"resume=true num-server-rounds=1 min-nodes=2 {RUN}"
        )
        log = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, log[-4000:]
        versions = sorted(catalog.list_versions(), key=lambda v: v.round)
        runs = {r.run_id for r in catalog.list_runs()}
        resumed_id = (runs - {stopped_id}).pop()
        rounds = {
            run: by_round(catalog.rounds(run)) for run in (stopped_id, resumed_id)
        }
        lease = catalog.lease()

    # the stopped run: round 1 done, round 2 cut short -> failed, no version
    assert {n: r.status for n, r in cut.items()} == {1: "completed", 2: "failed"}
    # the resumed run's first round is the last recorded + 1, from its version
    assert "resuming from version v0001" in log and "round 2/2:" in log, log[-4000:]
    # one version per round number, chained, with one class map throughout
    assert [(v.round, v.run_id) for v in versions] == [
        (1, stopped_id),
        (2, resumed_id),
    ]
    assert versions[1].parent_id == versions[0].id
    assert versions[1].class_map == versions[0].class_map
    assert [v.is_current for v in versions] == [False, True]
    # one completed round per number: 1 by the stopped run, 2 again, resumed
    completed = sorted(
        n for run in rounds.values() for n, r in run.items() if r.status == "completed"
    )
    assert completed == [1, 2]
    assert rounds[stopped_id][2].status == "failed"
    assert set(rounds[resumed_id]) == {2}
    assert lease.holder is None


def _serverapps(fed: Federation) -> list[int]:
    """The ServerApp processes the SuperLink started that are still alive."""
    return [p for p in descendants(fed.procs[0].pid) if "flwr-serverapp" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.deployment
def test_nodes_that_cannot_read_their_data_reply_errors_and_the_round_goes_on(
    tmp_path: Path,
) -> None:
    good = write_image_folder(tmp_path / "good", per_class=10)
    no_images = tmp_path / "no-images"  # a folder, but no category folder in it
    no_images.mkdir()
    (no_images / "readme.txt").write_text("photos go in <category-slug>/ folders")
    missing = tmp_path / "not-there"
    with federation(tmp_path) as fed:
        for folder in (good, missing, no_images):
            fed.add_supernode(folder)
        fed.wait_online(3)
        run = deploy_run(
            fed.env, f"num-server-rounds=1 min-nodes=3 fraction-evaluate=1.0 {RUN}"
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        alive = [p.poll() is None for p in fed.supernodes]
        catalog = fed.catalog()
        run_id = catalog.list_runs()[0].run_id
        rnd = catalog.rounds(run_id)[0]
        errors = {
            (n.kind, n.node_id): str(n.error)
            for n in catalog.node_rounds(run_id)
            if n.error is not None
        }
        versions = catalog.list_versions(run_id=run_id)

    assert alive == [True, True, True]  # no SuperNode crashed
    assert "round 1/1: 1/3 nodes replied, 2 rejected (2 error)" in log, log[-4000:]
    assert (rnd.status, rnd.nodes_sampled, rnd.nodes_replied, rnd.nodes_rejected) == (
        "completed",
        3,
        1,
        2,
    )
    assert len(versions) == 1  # trained on the one node that could
    # train and evaluate errors, per node, with the reason and not a traceback
    assert sorted(k for k, _ in errors) == ["evaluate", "evaluate", "train", "train"]
    reasons = set(errors.values())
    assert all(r.startswith("node data unusable: ") for r in reasons), reasons
    assert any(f"{missing} does not exist" in r for r in reasons), reasons
    assert any(f"no usable images under {no_images}" in r for r in reasons)
    assert not any("<class" in r for r in reasons)
    for kind, node in errors:  # logged with the node id, train and evaluate
        said = "reply from node" if kind == "train" else "evaluate reply from node"
        assert f"{said} {node} " in log, log[-4000:]


# ---------------------------------------------------------------- unit level


SHAPES = {"w": (4, 3), "b": (4,)}


def _train_reply(node: int) -> Message:
    arrays = ArrayRecord({k: Array(np.ones(s, np.float32)) for k, s in SHAPES.items()})
    metrics = MetricRecord({keys.NUM_EXAMPLES: 10})
    return reply(node, RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}))


class LinkGrid:
    """A Grid that answers like Flower's SuperLink: a reply from live nodes, its
    own NODE_UNAVAILABLE error (Flower's code makes it) for a dead one, nothing
    from a hung one."""

    def __init__(self, live: set[int], dead: set[int]) -> None:
        self.live, self.dead = live, dead
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.live:
                self.replies[mid] = _train_reply(node)
                self.replies[mid].metadata.__dict__["_reply_to_message_id"] = mid
            elif node in self.dead:
                self.replies[mid] = create_message_error_unavailable_res_message(
                    msg.metadata, "node_unavail"
                )
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_dead_node_is_named_in_the_superlinks_reply_and_a_silent_one_timed_out() -> (
    None
):
    set_task_identity()
    grid = LinkGrid(live={11, 12}, dead={13})
    folder = ReplyFolder(
        ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    )
    got = exchange(
        grid,  # type: ignore[arg-type]
        [instruction(n) for n in (11, 12, 13, 14)],
        timeout=0.3,
        on_reply=folder,
        on_missing=lambda node: folder.missed(node, 0.3),
    )
    assert got == 3 and folder.valid_count == 2
    why = {o.node_id: (o.failure, o.error) for o in folder.rejected}
    assert set(why) == {13, 14}  # not "node 1", the SuperLink that wrote the reply
    assert why[13][0] == "unavailable" and "Node Unavailable" in str(why[13][1])
    assert why[14] == ("timeout", "no reply within 0.3 s")
    assert {o.node_id for o in folder.outcomes} == {11, 12, 13, 14}


def _node_message(kind: str) -> Message:
    args = ModelArgs("cnn", 10, 1, 28, "group")
    # any map will do: the node fails before it reads one image
    class_map = ClassMap.from_names((f"Class {i}", f"class-{i}") for i in range(10))
    config = ConfigRecord({keys.LR: 0.01, keys.SERVER_ROUND: 1})
    put_model_context(config, args, class_map)
    content = RecordDict(
        {keys.ARRAYS: model_to_arrays(build_model(args)), keys.CONFIG: config}
    )
    return instruction(5, content, message_type=kind)


def _file(tmp: Path) -> Path:
    (tmp / "photos.zip").write_bytes(b"PK\x03\x04 not a folder")
    return tmp / "photos.zip"


def _corrupt_only(tmp: Path) -> Path:
    (tmp / "data" / "bag").mkdir(parents=True)
    (tmp / "data" / "bag" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp / "data"


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
@pytest.mark.parametrize(
    ("make_dir", "expected"),
    [
        (lambda tmp: tmp / "nowhere", "does not exist"),
        (_file, "is not a directory"),
        (_empty, "no usable images"),
        (_corrupt_only, "1 unreadable"),
        (lambda tmp: Path("relative/photos"), "must be absolute"),
    ],
    ids=["missing", "a-file", "empty", "corrupt-only", "relative"],
)
def test_a_node_whose_data_cannot_be_read_replies_an_error(
    tmp_path: Path, kind: str, make_dir: Callable[[Path], Path], expected: str
) -> None:
    node_config: dict[str, bool | float | int | str] = {
        keys.NODE_DATA_DIR: str(make_dir(tmp_path)),
        keys.NODE_CACHE_DIR: str(tmp_path / "cache"),
    }
    context = Context(7, 5, node_config, RecordDict(), {})
    # the ClientApp as a SuperNode calls it (its mods included), not train_fn
    out = client_app(message=_node_message(kind), context=context)
    assert out.has_error()
    assert out.error.code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    reason = str(out.error.reason)
    assert reason.startswith("node data unusable: ") and expected in reason, reason


def test_a_run_that_ends_mid_round_leaves_that_round_failed(tmp_path: Path) -> None:
    catalog = SyncCatalog(None, default_path=tmp_path / "catalog.db")
    catalog.migrate()
    catalog.start_round("run-a", 1, 3)
    catalog.finish_round("run-a", 1, replied=3, rejected=0)
    catalog.start_round("run-a", 2, 3)  # then `flwr stop`
    assert close_interrupted_rounds(catalog, "run-a") == [2]
    rounds = by_round(catalog.rounds("run-a"))
    assert (rounds[1].status, rounds[2].status) == ("completed", "failed")
    assert rounds[2].completed_at is not None
    assert close_interrupted_rounds(catalog, "run-a") == []  # nothing left open


@pytest.fixture
def own_exit_handlers() -> Iterator[None]:
    """Flower's exit-handler list is process-wide: run only this test's."""
    saved = list(exit_handler.registered_exit_handlers)
    exit_handler.registered_exit_handlers.clear()
    try:
        yield
    finally:
        exit_handler.registered_exit_handlers[:] = saved


def test_flowers_exit_handlers_give_the_lease_back_before_its_force_exit_timer(
    tmp_path: Path, own_exit_handlers: None
) -> None:
    """`flwr stop` -> flwr_exit: our cleanup runs before Flower's 5 s os._exit timer."""
    catalog = SyncCatalog(None, default_path=tmp_path / "catalog.db")
    catalog.migrate()
    with pytest.raises(SystemExit), held_lease(catalog, "run-a", 600):
        catalog.start_round("run-a", 1, 2)
        assert catalog.lease().holder == "run-a"
        # what Flower's signal handler does first, before starting its timer
        exit_handler.trigger_exit_handlers(run_before_force_exit=True)
        assert catalog.lease().holder is None
        assert by_round(catalog.rounds("run-a"))[1].status == "failed"
        raise SystemExit(1)  # ... and last, after telemetry
    assert catalog.lease().holder is None

    # a run that ended normally leaves nothing behind for a later exit
    with held_lease(catalog, "run-b", 600):
        catalog.start_round("run-b", 1, 2)
        catalog.finish_round("run-b", 1, replied=2, rejected=0)
    catalog.acquire_lease("run-c", 600)
    with held_lease(catalog, "run-d", 600, force=True):
        # gives back run-d only
        exit_handler.trigger_exit_handlers(run_before_force_exit=True)
        assert catalog.lease().holder is None
    assert by_round(catalog.rounds("run-b"))[1].status == "completed"
