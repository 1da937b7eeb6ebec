"""Benchmark: what a round costs on real SuperNodes, fedobj against plain Flower.

ONE deployed (not simulated) ``flower-superlink`` and ``--nodes`` (3)
``flower-supernode`` processes on 127.0.0.1, each over its own image folder of
``--images-per-node`` (480) Fashion-MNIST images written as PNG/JPEG (48 per
category, no image on two nodes). Against those same SuperNodes, one after the
other (``--order``), ``flwr run`` submits fedobj's app and the plain Flower app of
``plain_flower/`` (the quickstart-pytorch pattern; on a SuperNode it reads the
``data-dir`` folder with torchvision's ``ImageFolder``). Both train fedobj's
``cnn`` for one local epoch per round for ``--rounds`` (4) rounds, every node in
every round, with the same hyper-parameters, and score the global model on the
test images of ``--dataset-dir`` (default: the committed 1,000-image fixture, so
that the servers' centralised evaluation stays small beside the rest).

A SuperNode starts a fresh ClientApp process for every message (train, then
evaluate), so every message pays Python start-up, imports and loading the node's
data: the fixed cost this benchmark measures. Per app it reports

- ``round_s``: wall time between the arrivals of consecutive round lines in the
  ``flwr run --stream`` output (rounds 2.., the first pays the app's loading);
- ``train_s``: the slowest node's own training seconds in that round (fedobj: its
  ``metrics.parquet`` node rows; plain: its round line, measured the same way
  inside its ClientApp, around the epoch loop);
- ``overhead_s = round_s - train_s``: everything but the training, the figure the
  target is about (fedobj's overhead <= 0.5 x plain Flower's).

Output (stdout): one JSON line per app and round, one per app, then the
comparison ``{"bench": "deploy_rounds", "overhead_ratio", "target": 0.5, "met"}``.
Progress goes to stderr; with ``--log-dir`` every process's output is kept, each
line prefixed by seconds since the SuperLink started (the profile's raw data).
Every process started here is stopped at the end, with everything it started
(Flower's SuperExec and ClientApps run in sessions of their own), also on Ctrl-C
or SIGTERM. Exits 1 with one line when a run fails or a wait runs out.

    .venv/bin/python simulations/bench/deploy_rounds.py
    .venv/bin/python simulations/bench/deploy_rounds.py --order plain,ours --rounds 6

About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from fedobj.appstage import stage_app
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.launch import RunWatch
from fedobj.superlink import descendants

ROOT = Path(__file__).resolve().parents[2]
PLAIN_DIR = Path(__file__).resolve().parent / "plain_flower"
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"
BIN = Path(sys.executable).parent
TARGET = 0.5
CONNECTION = "bench"


def progress(msg: str) -> None:
    print(f"[deploy_rounds] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A wait ran out or a run failed: the benchmark's one-line exit."""


def write_folders(
    dest: Path, nodes: int, per_node: int, dataset_dir: str
) -> list[Path]:
    """``nodes`` image folders ``<dest>/device<i>/<slug>/<n>.png|jpg``, disjoint.

    PNG and JPEG alternate, as devices hold both; a node gets ``per_node // 10``
    images of each of the ten categories.
    """
    data = load_fashion_mnist("train", dataset_dir or None)
    per_class = per_node // 10
    folders = []
    for i in range(nodes):
        root = dest / f"device{i}"
        for c, slug in enumerate(data.label_slugs):
            (root / slug).mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(data.labels == c)
            mine = idx[i * per_class : (i + 1) * per_class]
            if len(mine) < per_class:
                raise BenchError(
                    f"{dataset_dir or 'the dataset'} has too few images of {slug} "
                    f"for {nodes} nodes x {per_class}"
                )
            for j, k in enumerate(mine):
                ext = "png" if j % 2 == 0 else "jpg"
                Image.fromarray(data.images[k, 0]).save(root / slug / f"{k}.{ext}")
        folders.append(root)
    return folders


@dataclass
class Fleet:
    """The SuperLink and SuperNodes this benchmark runs, with their logs."""

    home: Path
    env: dict[str, str]
    log_dir: Path
    t0: float = field(default_factory=time.monotonic)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def start(self, name: str, cmd: list[str]) -> None:
        """Start ``cmd`` in a session of its own, its output timestamped to a log."""
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        reader = threading.Thread(
            target=self._copy, args=(proc.stdout, self.log_dir / f"{name}.log")
        )
        reader.daemon = True
        reader.start()
        self.readers.append(reader)

    def _copy(self, stream: IO[bytes], path: Path) -> None:
        with open(path, "w") as out:
            for raw in stream:
                line = raw.decode(errors="replace")
                out.write(f"{time.monotonic() - self.t0:9.3f} {line}")
                out.flush()

    def stop(self) -> list[int]:
        """Stop every process started here and all they started; the pids left."""
        tree: set[int] = set()
        for p in self.procs:
            tree |= {p.pid} | descendants(p.pid)
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in tree:  # the SuperExec's and ClientApps' own sessions
            _kill(pid, signal.SIGTERM)
        _wait_gone(tree, 10)
        for pid in tree:
            _kill(pid, signal.SIGKILL)
        _wait_gone(tree, 5)
        return sorted(p for p in tree if _running(p))


def _kill(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)


def _healthy(port: int) -> bool:
    try:
        url = f"http://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def fleet(
    tmp: Path, folders: list[Path], port: int, env: dict[str, str], log_dir: Path
) -> Iterator[Fleet]:
    """A deployed SuperLink on ``port`` and one SuperNode per folder."""
    home = tmp / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**env, "FLWR_HOME": str(home)}
    f = Fleet(home, env, log_dir)
    try:
        f.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1"]
            + ["--port", str(port), "--control-api-address", f"127.0.0.1:{port + 1}"],
        )
        deadline = time.monotonic() + 60
        while not _healthy(port):
            if time.monotonic() > deadline or f.procs[0].poll() is not None:
                raise BenchError(f"the SuperLink did not come up: see {log_dir}")
            time.sleep(0.2)
        for i, root in enumerate(folders):
            node_config = (
                f"data-dir='{root}' cache-dir='{tmp / f'cache{i}'}' "
                f"device-id='bench-{i}'"
            )
            f.start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--insecure"]
                + ["--superlink", f"127.0.0.1:{port}", "--port", str(port + 10 + i)]
                + ["--node-config", node_config],
            )
        yield f
    finally:
        left = f.stop()
        if left:
            progress(f"processes left running: {left}")


@dataclass
class AppRun:
    """One app's rounds: arrival times of its round lines and training seconds."""

    name: str
    arrivals: dict[int, float] = field(default_factory=dict)
    train_s: dict[int, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def rounds(self) -> list[dict[str, Any]]:
        out = []
        for r in sorted(self.arrivals)[1:]:
            if r - 1 not in self.arrivals:
                continue
            secs = self.arrivals[r] - self.arrivals[r - 1]
            train = self.train_s.get(r)
            out.append(
                {
                    "bench": "deploy_rounds",
                    "app": self.name,
                    "round": r,
                    "round_s": round(secs, 2),
                    "train_s": None if train is None else round(train, 3),
                    "overhead_s": None if train is None else round(secs - train, 2),
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        rows = self.rounds()

        def mean(key: str) -> float | None:
            xs = [r[key] for r in rows if r[key] is not None]
            return round(sum(xs) / len(xs), 2) if xs else None

        return {
            "bench": "deploy_rounds",
            "app": self.name,
            "rounds_measured": len(rows),
            "round_s": mean("round_s"),
            "train_s": mean("train_s"),
            "overhead_s": mean("overhead_s"),
            "wall_s": round(self.wall_s, 1),
        }


def run_app(
    name: str,
    app_dir: Path,
    run_config: str,
    f: Fleet,
    tmp: Path,
    timeout_s: float,
) -> AppRun:
    """``flwr run`` one app against the fleet; fails unless the run completed."""
    staged = stage_app(app_dir, tmp / f"app-{name}")
    cmd = [str(BIN / "flwr"), "run", str(staged), CONNECTION, "--stream"]
    cmd += ["--run-config", run_config]
    res, watch = AppRun(name), RunWatch()
    progress(f"{name}: flwr run ({run_config})")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=f.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout_s, proc.kill)  # bound the whole run
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        with open(f.log_dir / f"flwr-{name}.log", "w") as log:
            for line in proc.stdout:
                now = time.monotonic()
                log.write(f"{now - f.t0:9.3f} {line}")
                tail = (tail + [line])[-20:]
                watch.feed(line)
                if (r := _round_of(line)) is not None:
                    res.arrivals[r] = now
                    if (train := _slowest(line)) is not None:
                        res.train_s[r] = train
                    progress(f"{name}: round {r} at {now - t0:.1f} s")
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res.wall_s = time.monotonic() - t0
    if res.wall_s >= timeout_s:
        raise BenchError(f"{name}: the run took over {timeout_s:.0f} s")
    outcome = watch.outcome(f.env, connection=CONNECTION, exit_code=code)
    if not outcome.completed:
        raise BenchError(f"{name}: {outcome.describe()}")
    if not res.arrivals:
        raise BenchError(f"{name}: no round line; last output: {''.join(tail)}")
    return res


def _round_of(line: str) -> int | None:
    """The round a fedobj or plainfl round line reports, else None."""
    if "nodes replied" not in line or "central accuracy" not in line:
        return None
    head = line.split("nodes replied")[0].rsplit("round ", 1)[-1]
    return int(head.split("/")[0])


def _slowest(line: str) -> float | None:
    """plainfl's "(slowest 0.61 s)"; fedobj's round line carries no such field."""
    if "(slowest " not in line:
        return None
    try:
        return float(line.split("(slowest ")[1].split(" s)")[0])
    except ValueError:
        return None


def fedobj_train_seconds(outputs: Path) -> dict[int, float]:
    """The slowest node's training seconds per round, from fedobj's node rows."""
    import pyarrow.parquet as pq

    files = sorted(outputs.glob("*/metrics.parquet"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise BenchError(f"fedobj wrote no metrics.parquet under {outputs}")
    slowest: dict[int, float] = {}
    for row in pq.read_table(files[-1]).to_pylist():
        if row.get("kind") == "node-train" and row.get("seconds") is not None:
            r = int(row["round"])
            slowest[r] = max(slowest.get(r, 0.0), float(row["seconds"]))
    return slowest


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--images-per-node", type=int, default=480)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--order", default="ours,plain", help="ours,plain or plain,ours")
    ap.add_argument(
        "--dataset-dir",
        default=str(FIXTURE),
        help="Fashion-MNIST IDX folder: the nodes' images and the servers' test set",
    )
    ap.add_argument("--port-base", type=int, default=39791, help="uses 2 + nodes")
    ap.add_argument("--run-timeout", type=float, default=600.0)
    ap.add_argument(
        "--superexec-poll",
        type=float,
        default=None,
        help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL for the SuperNodes (Flower: 1.0 s)",
    )
    ap.add_argument(
        "--ours-extra",
        default="evaluate-on-arrival=true",
        help="fedobj's own run config on top of the shared one (default: its "
        'deployment setting; "" for a separate evaluate message per round)',
    )
    ap.add_argument("--log-dir", type=Path, default=None, help="keep every log")
    args = ap.parse_args()
    order = [s.strip() for s in args.order.split(",") if s.strip()]
    if sorted(order) != ["ours", "plain"]:
        ap.error("--order must name ours and plain once each")
    # SIGTERM (and SIGINT, ignored in background jobs) must still run the cleanups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = bench(args, order)
    except BenchError as exc:
        print(f"deploy_rounds: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


def bench(args: argparse.Namespace, order: list[str]) -> dict[str, Any]:
    """Write the folders, start the fleet, run both apps, compare."""
    shared = (
        f"num-server-rounds={args.rounds} min-nodes={args.nodes} fraction-train=1.0 "
        "fraction-evaluate=1.0 local-epochs=1 batch-size=32 lr=0.03 lr-min=0.005 "
        "momentum=0.9 weight-decay=0.0005 eval-fraction=0.1 seed=42 client-threads=1"
    )
    configs = {
        "ours": (
            ROOT,
            f'{shared} strategy="fedavg" model="cnn" norm="group" {args.ours_extra}',
        ),
        "plain": (PLAIN_DIR, shared),
    }
    with tempfile.TemporaryDirectory(prefix="fedobj-deploy-rounds-") as name:
        tmp = Path(name)
        log_dir = args.log_dir or tmp / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        folders = write_folders(
            tmp / "data", args.nodes, args.images_per_node, args.dataset_dir
        )
        env = dict(os.environ)
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FEDOBJ_OUTPUTS_DIR=str(tmp / "outputs"),
            FEDOBJ_FASHION_MNIST_DIR=args.dataset_dir,
            PYTHONUNBUFFERED="1",
        )
        if args.superexec_poll is not None:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
        results: dict[str, AppRun] = {}
        with fleet(tmp, folders, args.port_base, env, log_dir) as f:
            for app in order:
                app_dir, run_config = configs[app]
                results[app] = run_app(
                    app, app_dir, run_config, f, tmp, args.run_timeout
                )
        results["ours"].train_s = fedobj_train_seconds(tmp / "outputs")
    for app in order:
        for row in results[app].rounds():
            print(json.dumps(row), flush=True)
    ours, plain = results["ours"].summary(), results["plain"].summary()
    for s in (ours, plain):
        print(json.dumps(s), flush=True)
    ratio = None
    if ours["overhead_s"] is not None and plain["overhead_s"]:
        ratio = round(ours["overhead_s"] / plain["overhead_s"], 3)
    return {
        "bench": "deploy_rounds",
        "overhead_ratio": ratio,
        "round_ratio": round(ours["round_s"] / plain["round_s"], 3)
        if ours["round_s"] and plain["round_s"]
        else None,
        "target": TARGET,
        "met": ratio is not None and ratio <= TARGET,
        "ours_overhead_s": ours["overhead_s"],
        "plain_overhead_s": plain["overhead_s"],
        "nodes": args.nodes,
        "images_per_node": args.images_per_node,
        "rounds": args.rounds,
        "order": order,
        "superexec_poll": args.superexec_poll,
    }


if __name__ == "__main__":
    sys.exit(main())
