"""Benchmark: open-loop HTTP load on a real admin API server, per database.

For each database kind (a SQLite file, and a fresh PostgreSQL schema) this script
prepares a temporary outputs folder and catalog (the 10 Fashion-MNIST categories, a
``cnn`` trained for a few seconds and registered as the current version, an
admin, a viewer and a device key), starts ``fedobj admin serve --rate-limit 0`` on
127.0.0.1, warms it up (the first ``/detect`` exports the ONNX model), then offers
each endpoint a series of fixed request rates and stops the server (SIGTERM, then
SIGKILL after a grace period).

    .venv/bin/python simulations/bench/api_load.py                 # both databases
    .venv/bin/python simulations/bench/api_load.py --db sqlite --duration 3
    .venv/bin/python simulations/bench/api_load.py --baseline HEAD~1 --db sqlite

Endpoints and targets (p95 at the target rate, no failures):

- ``list``: ``GET /api/v1/categories`` (viewer key), 20 ms at 1,000 req/s;
- ``current``: ``GET /api/v1/versions/current`` (viewer key), 20 ms at 1,000 req/s;
- ``detect``: ``POST /api/v1/detect``, one of 10 28x28 PNGs (device key), 50 ms
  at 300 req/s;
- ``write``: ``POST /api/v1/categories`` with a new name each (admin key), then a
  second window ``delete`` that hard-deletes every category the first created
  (``DELETE /api/v1/categories/{id}?hard=true``, ids from the 201 bodies) at the
  same rate; 50 ms each at 100 req/s. After each window the database is counted
  (the script's own catalog connection): ``rows_created`` rows carry the window's
  names, ``lost`` 201s have no row, ``duplicates`` counts repeated names and
  repeated class indexes, ``audit_rows`` the ``category.create`` (then
  ``category.delete``) rows naming them, ``rows_left`` what the deletes left. The
  target also needs one row and one audit row per 201, one audit row per delete and
  nothing left. Anything left is then deleted without measuring, so the next
  window starts from the same catalog;
- ``health``: ``GET /health`` (no key; not run by default): the HTTP stack and a
  database ping, to calibrate the load generator's own cost.

What is measured. The load is *open-loop*: request ``i`` of a window is due at
``t0 + i/R`` whether or not earlier ones have been answered, and its latency runs
from that due time to the end of its response body, so time spent queued (in the
client waiting for a free connection, the kernel, the server) counts; a server
that falls behind shows it in the tail instead of silently receiving fewer
requests (coordinated omission). A request unanswered ``--timeout`` after its due
time is a timeout. Per (database, server, endpoint, rate) one JSON line on stdout:
requests sent, 2xx answers, other answers and transport errors (``failures`` by
kind), timeouts, achieved rate (2xx per second of the window including its drain),
latency percentiles over *every* request sent (a failure counts at the time it
failed), ``send_lag_p95_ms`` (due time to the write: the client's own queueing), CPU
of the load generator, of the server process and of the whole machine
(``host_cpu_pct``: all cores, so other work on the machine shows), each in per cent
of one core, and whether p95 met the endpoint's bound with no failures. Then one
summary line per (database, server, endpoint). Progress: stderr.

The load generator (``rawhttp.py`` beside this file) is a raw asyncio HTTP/1.1
client under uvloop: prebuilt request bytes, ``--connections`` keep-alive
connections each owned by one worker, a scheduler that queues requests at the
offered rate. Its CPU, measured against ``health`` (2026-12-07, 2 busy cores):
0.15 ms a request at 1,000 req/s, 0.3 ms at 200 (wake-ups not shared); httpx, used
before and now only for warm-up, took 1.4 ms at 200 req/s and fell behind at 400
with the server at a fifth of a core.

Baseline. ``--baseline REF`` checks REF out into a temporary ``git worktree``
(removed at the end) and, for each database, runs every window first against a
server started from that tree (``PYTHONPATH`` and working directory set to it),
then against this checkout's, on the same prepared database. Each record says
``"server": "baseline"|"this"`` and ``"ref"`` (a commit id; ``dirty``: this
checkout has uncommitted changes). Compare servers within one invocation only.

Caveat: load generator and server share this machine's cores (2 on the project's
benchmark machine); compare ``loadgen_cpu_pct`` and ``server_cpu_pct`` before
blaming either.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import httpx
import numpy as np
from rawhttp import Pool, Request, Window, build_request
from rawhttp import run as run_async

from fedobj.adminproc import AdminProcess, serve_admin
from fedobj.catalog import CategoryRecord, SyncCatalog

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_FMNIST = ROOT / "tests" / "fixtures" / "fashion-mnist"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
API = "/api/v1"
# Audit actions the catalog writes (fedobj/catalog/categories.py).
AUDIT_CREATE = "category.create"
AUDIT_DELETE = "category.delete"


@dataclass(frozen=True)
class Endpoint:
    """One benchmarked route: how to call it and what it should achieve."""

    name: str
    method: str
    path: str
    role: str | None  # the key it is called with; None: no key
    default_rates: tuple[float, ...]
    target_p95_ms: float
    target_rate: float  # the rate at which target_p95_ms is the stated goal


LIST_RATES = (250, 500, 1000, 1500)
ENDPOINTS = {
    "list": Endpoint(
        "list", "GET", f"{API}/categories", "viewer", LIST_RATES, 20.0, 1000
    ),
    "current": Endpoint(
        "current", "GET", f"{API}/versions/current", "viewer", LIST_RATES, 20.0, 1000
    ),
    "detect": Endpoint(
        "detect", "POST", f"{API}/detect", "device", (100, 200, 300, 400), 50.0, 300
    ),
    "write": Endpoint(
        "write", "POST", f"{API}/categories", "admin", (50, 100, 200), 50.0, 100
    ),
    "health": Endpoint("health", "GET", "/health", None, LIST_RATES, 20.0, 1000),
}
# The second window of "write"; it runs at write's rates.
DELETE = Endpoint(
    "delete", "DELETE", f"{API}/categories/{{id}}?hard=true", "admin", (), 50.0, 100
)


def log(msg: str) -> None:
    print(f"[api_load] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ preparation


def train_state(images: int, epochs: int) -> dict[str, object]:
    """A ``cnn`` trained briefly on the first ``images`` training images.

    Inference cost does not depend on accuracy; training only makes the answers
    plausible (and the ONNX export realistic). The full set is used if installed.
    """
    import torch

    from fedobj.data.fashion_mnist import load_fashion_mnist
    from fedobj.errors import DatasetNotFoundError
    from fedobj.model.factory import ModelArgs, build_model
    from fedobj.train import LabelledTensors, TrainConfig, train

    try:
        data = load_fashion_mnist("train")
    except DatasetNotFoundError:
        data = load_fashion_mnist("train", FIXTURE_FMNIST)
    data = data.subset(np.arange(min(images, len(data))))
    torch.manual_seed(0)
    model = build_model(ModelArgs(num_classes=10))
    tensors = LabelledTensors(
        torch.from_numpy(data.images), torch.from_numpy(data.labels.astype(np.int64))
    )
    result = train(model, tensors, TrainConfig(epochs=epochs, lr=0.05))
    log(
        f"trained cnn on {len(data)} images x {epochs} epochs in "
        f"{result.seconds:.1f} s (train accuracy {result.accuracy:.3f})"
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pngs() -> list[bytes]:
    """One 28x28 PNG per class from the test split (requests cycle through them)."""
    from PIL import Image

    from fedobj.data.fashion_mnist import load_fashion_mnist
    from fedobj.errors import DatasetNotFoundError

    try:
        data = load_fashion_mnist("test")
    except DatasetNotFoundError:
        data = load_fashion_mnist("test", FIXTURE_FMNIST)
    pngs = []
    for c in range(10):
        buf = io.BytesIO()
        Image.fromarray(data.images[int(np.flatnonzero(data.labels == c)[0]), 0]).save(
            buf, format="PNG"
        )
        pngs.append(buf.getvalue())
    return pngs


def multipart(field_name: str, filename: str, payload: bytes) -> tuple[bytes, str]:
    """A ready ``multipart/form-data`` body and its content type.

    Built once per image so the load generator does not re-encode every request.
    """
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@contextmanager
def database(kind: str, tmp: Path, pg_admin: str) -> Iterator[str]:
    """An empty database URL of ``kind``; a PostgreSQL schema is dropped after."""
    if kind == "sqlite":
        yield f"sqlite://{tmp / 'catalog.db'}"
        return
    import asyncpg

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin, timeout=5)
        try:
            await conn.execute(sql, timeout=60)
        finally:
            await conn.close()

    schema = f"fedobj_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_admin else "?"
    try:
        yield f"{pg_admin}{sep}search_path={schema}"
    finally:
        asyncio.run(admin(f'DROP SCHEMA "{schema}" CASCADE'))
        log(f"dropped schema {schema}")


def prepare_catalog(
    url: str, outputs: Path, state: dict[str, object]
) -> dict[str, str]:
    """Migrate, seed, register the trained version; return a token per role."""
    from fedobj.apikeys import hash_token, load_secret, new_token
    from fedobj.model.checkpoint import Checkpoint
    from fedobj.model.factory import ModelArgs
    from fedobj.registry import ArtifactStore

    catalog = SyncCatalog(url)
    catalog.migrate()
    catalog.seed_categories()
    class_map = catalog.snapshot()
    ckpt = Checkpoint(
        ModelArgs(num_classes=class_map.num_classes),
        class_map,
        state,  # type: ignore[arg-type]
    )
    art = ArtifactStore(outputs).save_checkpoint("bench-run/round-0001.pt", ckpt)
    catalog.register_version(
        run_id="bench-run",
        round=1,
        class_map=class_map,
        metrics={},
        checkpoint_uri=art.uri,
        checkpoint_sha256=art.sha256,
        size_bytes=art.size,
    )
    secret = load_secret(outputs / "api-secret")
    keys = {}
    for role in ("admin", "viewer", "device"):
        key = new_token()
        catalog.create_api_key(
            key.key_id, hash_token(secret, key.token), role, f"api_load {role}"
        )
        keys[role] = key.token
    return keys


# ------------------------------------------------------------------ servers


@dataclass(frozen=True)
class Tree:
    """Where a server's code comes from: this checkout or a baseline worktree."""

    label: str  # "this" | "baseline"
    path: Path
    ref: str  # commit id
    dirty: bool  # uncommitted changes (this checkout only)


def git(*argv: str) -> str:
    done = subprocess.run(
        ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout.strip()


def this_tree() -> Tree:
    dirty = bool(git("--no-optional-locks", "status", "-s"))  # no index refresh
    return Tree("this", ROOT, git("rev-parse", "HEAD"), dirty)


@contextmanager
def baseline_tree(ref: str) -> Iterator[Tree]:
    """``ref`` checked out in a temporary worktree, always removed afterwards."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tmp = Path(tempfile.mkdtemp(prefix="fedobj-api-load-baseline-"))
    path = tmp / "tree"
    try:
        git("worktree", "add", "--detach", str(path), sha)
        log(f"baseline {ref} = {sha[:12]} checked out at {path}")
        yield Tree("baseline", path, sha, False)
    finally:
        try:
            git("worktree", "remove", "--force", str(path))
            log(f"removed worktree {path}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def tree_env(tree: Tree) -> dict[str, str]:
    """Environment that makes ``fedobj`` and ``admin_api`` import from ``tree``.

    The editable install's finder comes after ``sys.path`` entries, so a
    ``PYTHONPATH`` entry wins for the baseline; this checkout needs nothing.
    """
    if tree.path == ROOT:
        return {}
    return {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(tree.path), os.environ.get("PYTHONPATH")])
        )
    }


def check_imports(tree: Tree) -> None:
    """Refuse to measure a server whose packages would not come from ``tree``."""
    code = "import admin_api, fedobj; print(admin_api.__file__); print(fedobj.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree.path,
        env={**os.environ, **tree_env(tree)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    files = done.stdout.split()
    if done.returncode != 0 or not all(
        Path(f).is_relative_to(tree.path) for f in files
    ):
        raise RuntimeError(
            f"{tree.label} server would import {files or done.stderr.strip()}, "
            f"not from {tree.path}"
        )


@contextmanager
def serve(
    url: str, outputs: Path, grace_s: float, tree: Tree
) -> Iterator[AdminProcess]:
    """``fedobj admin serve`` from ``tree`` on a free port; always stopped."""
    check_imports(tree)
    stack = ExitStack()
    # serve_admin takes no env=; it copies os.environ as it starts the process.
    with mock.patch.dict(os.environ, tree_env(tree)):
        server = stack.enter_context(
            serve_admin(outputs, url, cwd=tree.path, stop_grace_s=grace_s)
        )
    try:
        log(f"{tree.label} server pid {server.proc.pid} on {server.base_url}")
        yield server
    finally:
        stack.close()
        log(f"server pid {server.proc.pid} stopped (exit {server.proc.returncode})")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def host_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle or iowait), machine-wide."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def cpu_now(pid: int) -> np.ndarray:
    """CPU seconds so far: this process, the server, the whole machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([ru.ru_utime + ru.ru_stime, proc_cpu_s(pid), host_busy_s()])


# ------------------------------------------------------------------ load


def percentile_ms(sorted_s: np.ndarray, q: float) -> float | None:
    if sorted_s.size == 0:
        return None
    return round(float(np.percentile(sorted_s, q)) * 1000, 2)


async def load_window(
    server: AdminProcess,
    requests: list[Request],
    rate: float,
    count: int,
    args: argparse.Namespace,
) -> tuple[Window, np.ndarray]:
    """One window on fresh keep-alive connections; its outcomes and CPU seconds."""
    where = urlsplit(server.base_url)
    async with Pool(
        where.hostname or "127.0.0.1", where.port or 80, args.connections
    ) as pool:
        before = cpu_now(server.proc.pid)
        window = await pool.open_loop(requests, rate, count, args.timeout)
        return window, cpu_now(server.proc.pid) - before


def measure(
    server: AdminProcess,
    labels: dict[str, object],
    endpoint: Endpoint,
    requests: list[Request],
    rate: float,
    count: int,
    args: argparse.Namespace,
) -> tuple[dict[str, object], Window]:
    """One rate window; its record (not yet printed) and outcomes."""
    who = f"{labels['db']} {labels['server']} {endpoint.name}"
    log(f"{who}: {count} requests at {rate:g}/s")
    window, cpu = run_async(load_window(server, requests, rate, count, args))
    if window.kinds:
        log(f"  failures: {dict(window.kinds)}")
    wall = window.wall_s
    lat = np.sort(np.asarray(window.latencies_s))
    p95 = percentile_ms(lat, 95)
    record: dict[str, object] = {
        "bench": "api_load",
        **labels,
        "endpoint": endpoint.name,
        "offered_rps": rate,
        "sent": count,
        "ok": window.ok,
        "errors": window.errors,
        "timeouts": window.timeouts,
        "failures": dict(window.kinds),
        "achieved_rps": round(window.ok / wall, 1),
        "p50_ms": percentile_ms(lat, 50),
        "p95_ms": p95,
        "p99_ms": percentile_ms(lat, 99),
        "max_ms": percentile_ms(lat, 100),
        "send_lag_p95_ms": percentile_ms(np.sort(np.asarray(window.send_lag_s)), 95),
        "loadgen_cpu_pct": round(100 * cpu[0] / wall, 1),
        "server_cpu_pct": round(100 * cpu[1] / wall, 1),
        "host_cpu_pct": round(100 * cpu[2] / wall, 1),
        "target_p95_ms": endpoint.target_p95_ms,
        "meets_target": p95 is not None
        and p95 < endpoint.target_p95_ms
        and window.errors == 0
        and window.timeouts == 0,
    }
    return record, window


def between_windows(
    server: AdminProcess, record: dict[str, object], pause_s: float
) -> None:
    print(json.dumps(record), flush=True)
    server.check_alive()
    time.sleep(pause_s)


def window_count(rate: float, args: argparse.Namespace) -> int:
    return max(1, min(int(rate * args.duration), int(args.max_requests)))


def auth(keys: dict[str, str], endpoint: Endpoint) -> dict[str, str]:
    if endpoint.role is None:
        return {}
    return {"Authorization": f"Bearer {keys[endpoint.role]}"}


def read_windows(
    server: AdminProcess,
    labels: dict[str, object],
    endpoint: Endpoint,
    keys: dict[str, str],
    bodies: list[tuple[bytes, str]],
    rates: list[float],
    args: argparse.Namespace,
) -> list[dict[str, object]]:
    """All rate windows of a read endpoint (or ``detect``)."""
    host = urlsplit(server.base_url).netloc
    headers = auth(keys, endpoint)
    if endpoint.name == "detect":
        requests = [
            build_request(
                "POST", endpoint.path, host, {**headers, "Content-Type": ct}, b
            )
            for b, ct in bodies
        ]
    else:
        requests = [build_request(endpoint.method, endpoint.path, host, headers)]
    records = []
    for rate in rates:
        record, _ = measure(
            server, labels, endpoint, requests, rate, window_count(rate, args), args
        )
        between_windows(server, record, args.pause)
        records.append(record)
    return records


def tagged(catalog: SyncCatalog, tag: str, limit: int) -> list[CategoryRecord]:
    """Categories named by one write window (``load <tag> <i>``)."""
    return catalog.list_categories(search=f"load {tag} ", limit=limit)


def audited(catalog: SyncCatalog, action: str, targets: set[str], limit: int) -> int:
    """Audit rows of ``action`` naming one of ``targets`` (newest ``limit`` read)."""
    rows = catalog.list_audit(action=action, limit=limit)
    return sum(1 for r in rows if r.target in targets)


def write_windows(
    server: AdminProcess,
    labels: dict[str, object],
    keys: dict[str, str],
    url: str,
    rate: float,
    args: argparse.Namespace,
) -> tuple[dict[str, object], dict[str, object]]:
    """Create categories at ``rate``, count them, delete them at ``rate``, count.

    Returns the ``write`` and ``delete`` records, already printed.
    """
    endpoint = ENDPOINTS["write"]
    host = urlsplit(server.base_url).netloc
    headers = {**auth(keys, endpoint), "Content-Type": "application/json"}
    tag = uuid.uuid4().hex[:8]
    count = window_count(rate, args)
    limit = 2 * count + 100  # enough to see any duplicate
    requests = [
        build_request(
            "POST",
            endpoint.path,
            host,
            headers,
            json.dumps({"name": f"load {tag} {i}", "description": ""}).encode(),
            keep_body=True,
        )
        for i in range(count)
    ]
    write, window = measure(server, labels, endpoint, requests, rate, count, args)
    acked = {
        str(json.loads(body)["id"]) for status, body in window.bodies if status == 201
    }
    catalog = SyncCatalog(url)
    rows = tagged(catalog, tag, limit)
    everything = catalog.list_categories(limit=1_000_000)
    ids = {str(r.id) for r in rows}
    write.update(
        rows_created=len(rows),
        lost=len(acked - ids),
        duplicates=(len(rows) - len({r.name.casefold() for r in rows}))
        + (len(everything) - len({r.class_index for r in everything})),
        audit_rows=audited(catalog, AUDIT_CREATE, ids | acked, limit),
    )
    write["meets_target"] = bool(
        write["meets_target"]
        and write["rows_created"] == len(acked) == window.ok
        and write["lost"] == write["duplicates"] == 0
        and write["audit_rows"] == len(acked)
    )
    between_windows(server, write, args.pause)

    delete_headers = auth(keys, DELETE)
    deletes = [
        build_request("DELETE", DELETE.path.format(id=i), host, delete_headers)
        for i in sorted(acked)
    ]
    delete, window = measure(server, labels, DELETE, deletes, rate, len(deletes), args)
    left = tagged(catalog, tag, limit)
    delete.update(
        rows_left=len(left),
        audit_rows=audited(catalog, AUDIT_DELETE, ids | acked, limit),
    )
    delete["meets_target"] = bool(
        delete["meets_target"]
        and delete["rows_left"] == 0
        and delete["audit_rows"] == window.ok == len(acked)
    )
    for row in left:  # unmeasured: the next window starts from the same catalog
        catalog.delete_category(row.id)
    if left:
        log(f"  deleted {len(left)} left-over categories")
    between_windows(server, delete, args.pause)
    return write, delete


def summary(
    labels: dict[str, object], endpoint: Endpoint, records: list[dict[str, object]]
) -> None:
    meeting = [float(r["offered_rps"]) for r in records if r["meets_target"]]  # type: ignore[arg-type]
    at_target = [r for r in records if r["offered_rps"] == endpoint.target_rate]
    print(
        json.dumps(
            {
                "bench": "api_load_summary",
                **labels,
                "endpoint": endpoint.name,
                "max_rate_meeting_target": max(meeting) if meeting else None,
                "target": f"{endpoint.name} p95 < {endpoint.target_p95_ms:g} ms at "
                f"{endpoint.target_rate:g} req/s",
                "met": bool(at_target[0]["meets_target"]) if at_target else None,
            }
        ),
        flush=True,
    )


def warm_up(
    server: AdminProcess, keys: dict[str, str], detect_body: tuple[bytes, str]
) -> None:
    """First ``/detect`` exports the ONNX model (seconds); then a few of each."""
    viewer = {"Authorization": f"Bearer {keys['viewer']}"}
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    device = {
        "Authorization": f"Bearer {keys['device']}",
        "Content-Type": detect_body[1],
    }
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        t = time.perf_counter()
        first = http.post(f"{API}/detect", content=detect_body[0], headers=device)
        if first.status_code != 200:
            raise RuntimeError(f"warm-up /detect: {first.status_code} {first.text}")
        log(f"first /detect (ONNX export) took {time.perf_counter() - t:.2f} s")
        for _ in range(20):
            for path, headers in (
                (f"{API}/categories", viewer),
                (f"{API}/versions/current", viewer),
                (f"{API}/categories", admin),
            ):
                r = http.get(path, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up {path}: {r.status_code} {r.text}")
        for _ in range(10):
            http.post(f"{API}/detect", content=detect_body[0], headers=device)


# ------------------------------------------------------------------ main


def parse_rates(values: list[str]) -> dict[str, list[float]]:
    rates = {name: list(e.default_rates) for name, e in ENDPOINTS.items()}
    for value in values:
        name, _, listed = value.partition("=")
        if name not in ENDPOINTS or not listed:
            raise argparse.ArgumentTypeError(
                f"--rates wants ENDPOINT=R1,R2,... with ENDPOINT in "
                f"{sorted(ENDPOINTS)}, got {value!r}"
            )
        rates[name] = [float(r) for r in listed.split(",")]
    return rates


def run_db(
    kind: str,
    state: dict[str, object],
    pngs: list[bytes],
    rates: dict[str, list[float]],
    trees: list[Tree],
    args: argparse.Namespace,
) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="fedobj-api-load-") as tmp_name,
        database(kind, Path(tmp_name), args.postgres_url) as url,
    ):
        outputs = Path(tmp_name) / "outputs"
        outputs.mkdir()
        keys = prepare_catalog(url, outputs, state)
        log(f"{kind}: catalog ready at {url}")
        bodies = [multipart("image", f"{i}.png", p) for i, p in enumerate(pngs)]
        for tree in trees:
            labels: dict[str, object] = {
                "db": kind,
                "server": tree.label,
                "ref": tree.ref,
                "dirty": tree.dirty,
            }
            with serve(url, outputs, args.grace, tree) as server:
                warm_up(server, keys, bodies[0])
                for name in args.endpoints:
                    endpoint = ENDPOINTS[name]
                    if name != "write":
                        records = read_windows(
                            server, labels, endpoint, keys, bodies, rates[name], args
                        )
                        summary(labels, endpoint, records)
                        continue
                    pairs = [
                        write_windows(server, labels, keys, url, rate, args)
                        for rate in rates[name]
                    ]
                    summary(labels, endpoint, [w for w, _ in pairs])
                    summary(labels, DELETE, [d for _, d in pairs])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Latency runs from each request's scheduled send time to the end of "
        "its response; percentiles are over every request sent. meets_target: "
        "p95 under the bound (list and current 20 ms, detect, write and delete "
        "50 ms) and no errors or timeouts (write and delete: and the rows and audit "
        "rows counted afterwards match the answers). The load generator shares the "
        "CPU with the server: read the *_cpu_pct fields before the latencies.",
    )
    ap.add_argument(
        "--db",
        action="append",
        choices=("sqlite", "postgres"),
        help="database kind; repeat for both (default: sqlite, then postgres)",
    )
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get("FEDOBJ_TEST_POSTGRES_URL", DEFAULT_PG),
        help="admin URL of the PostgreSQL server; a schema is created in it and "
        "dropped afterwards (default: $FEDOBJ_TEST_POSTGRES_URL or %(default)s)",
    )
    ap.add_argument(
        "--endpoints",
        default="list,current,detect,write",
        help="comma-separated, from: list (GET /api/v1/categories), current "
        "(GET /api/v1/versions/current), detect (POST /api/v1/detect, one 28x28 "
        "PNG), write (POST /api/v1/categories, then a delete window removing "
        "them), health (GET /health); default %(default)s",
    )
    ap.add_argument(
        "--rates",
        action="append",
        default=[],
        metavar="ENDPOINT=R1,R2,...",
        help="offered rates in requests/s for one endpoint (repeatable); defaults: "
        + " ".join(
            f"{n}={','.join(f'{r:g}' for r in e.default_rates)}"
            for n, e in ENDPOINTS.items()
        ),
    )
    ap.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also measure a server run from this commit (a temporary git "
        "worktree), before this checkout's, on the same database",
    )
    ap.add_argument(
        "--duration", type=float, default=10.0, help="seconds per rate (default 10)"
    )
    ap.add_argument(
        "--max-requests",
        type=int,
        default=20000,
        help="at most this many requests per rate (default %(default)s)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="per-request limit in seconds from its scheduled time, counted as a "
        "timeout (default 10)",
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=64,
        help="keep-alive client connections (default %(default)s)",
    )
    ap.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="idle seconds between rate windows (default 1)",
    )
    ap.add_argument(
        "--grace",
        type=float,
        default=15.0,
        help="seconds the server gets after SIGTERM before SIGKILL (default 15)",
    )
    ap.add_argument(
        "--train-images",
        type=int,
        default=4000,
        help="training images for the served cnn (default %(default)s)",
    )
    ap.add_argument(
        "--train-epochs", type=int, default=2, help="its epochs (default 2)"
    )
    args = ap.parse_args()
    args.endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    unknown = set(args.endpoints) - set(ENDPOINTS)
    if unknown:
        ap.error(
            f"unknown endpoints {sorted(unknown)}; choose from {sorted(ENDPOINTS)}"
        )
    try:
        rates = parse_rates(args.rates)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    # SIGTERM (and SIGINT, ignored in background jobs) must still stop the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    t0 = time.perf_counter()
    state = train_state(args.train_images, args.train_epochs)
    pngs = test_pngs()
    with ExitStack() as stack:
        trees = [this_tree()]
        if args.baseline:
            trees.insert(0, stack.enter_context(baseline_tree(args.baseline)))
        for kind in args.db or ["sqlite", "postgres"]:
            run_db(kind, state, pngs, rates, trees, args)
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
