"""Benchmark: open-loop HTTP load on a real admin API server, per database.

For each database kind (a SQLite file, and a fresh PostgreSQL schema) this script
prepares a temporary outputs folder and catalog (the 10 Fashion-MNIST categories, a
``cnn`` trained for a few seconds and registered as the current version, API keys),
starts ``fedobj admin serve --rate-limit 0`` on 127.0.0.1, warms it up (the first
``/detect`` exports the ONNX model), then offers each endpoint a series of fixed
request rates and stops the server (SIGTERM, then SIGKILL after a grace period).

    .venv/bin/python simulations/bench/api_load.py                 # both databases
    .venv/bin/python simulations/bench/api_load.py --db sqlite --duration 3

What is measured. The load is *open-loop*: request ``i`` of a window is sent at
``t0 + i/R`` whether or not earlier ones have been answered, and its latency runs
from that scheduled time to the end of its response body, so time spent queued (in
the client's connection pool, the kernel, the server) counts; a server that falls
behind shows it in the tail instead of silently receiving fewer requests
(coordinated omission). Each request is bounded by ``--timeout``. Per (database,
endpoint, rate) one JSON line on stdout: requests sent, 2xx answers, other answers
and transport errors, timeouts, achieved rate (2xx per second of the window
including its drain), latency percentiles over *every* request sent (a failure
counts at the time it failed), CPU of the load generator, of the server process
and of the whole machine (``host_cpu_pct``: all cores, so other work on the machine
shows), each in per cent of one core, and whether p95 met the endpoint's bound with
no failures. Then one summary line per (database, endpoint). Progress: stderr.

Requests go round-robin over ``--clients`` httpx clients sharing ``--connections``:
httpcore assigns queued requests to connections with a scan over all of them, so a
single pool of 256 under overload burns the load generator's CPU (measured here:
400 req/s to ``/health`` collapsed into timeouts with one pool, held with 16).

Caveat: load generator and server share this machine's cores (2 on the project's
benchmark machine). The Python/httpx load generator costs roughly as much CPU per
request as the server's list endpoint does, so at high rates the two compete and
the figures are a lower bound on what the server alone could sustain; compare
``loadgen_cpu_pct`` and ``server_cpu_pct`` before blaming either.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from fedobj.adminproc import AdminProcess, serve_admin

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_FMNIST = ROOT / "tests" / "fixtures" / "fashion-mnist"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
API = "/api/v1"


@dataclass(frozen=True)
class Endpoint:
    """One benchmarked route: how to call it and what it should achieve."""

    name: str
    method: str
    path: str
    role: str
    default_rates: tuple[float, ...]
    target_p95_ms: float
    target_rate: float  # the rate at which target_p95_ms is the stated goal


ENDPOINTS = {
    "list": Endpoint(
        "list", "GET", f"{API}/categories", "viewer", (50, 100, 200, 400), 20.0, 200
    ),
    "detect": Endpoint(
        "detect", "POST", f"{API}/detect", "device", (25, 50, 100), 50.0, 50
    ),
}


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
            await conn.execute(sql)
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
    from fedobj.catalog import SyncCatalog
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
    for role in ("viewer", "device"):
        key = new_token()
        catalog.create_api_key(
            key.key_id, hash_token(secret, key.token), role, f"api_load {role}"
        )
        keys[role] = key.token
    return keys


# ------------------------------------------------------------------ server


Server = AdminProcess


@contextmanager
def serve(url: str, outputs: Path, grace_s: float) -> Iterator[Server]:
    """``fedobj admin serve`` on a free port; always stopped (TERM, then KILL)."""
    with serve_admin(outputs, url, cwd=ROOT, stop_grace_s=grace_s) as server:
        log(f"server pid {server.proc.pid} on {server.base_url}")
        yield server
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


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------ load


@dataclass
class Request:
    """What one request sends; the body (if any) is prebuilt."""

    method: str
    url: str
    headers: dict[str, str]
    content: bytes | None = None


@dataclass
class Window:
    """Outcomes of one rate window."""

    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


async def _one(
    client: httpx.AsyncClient,
    req: Request,
    scheduled: float,
    timeout_s: float,
    out: Window,
) -> None:
    outcome = "ok"
    try:
        async with asyncio.timeout(timeout_s):
            resp = await client.request(
                req.method, req.url, headers=req.headers, content=req.content
            )
        if not 200 <= resp.status_code < 300:
            outcome = f"HTTP {resp.status_code}"
    except (TimeoutError, httpx.TimeoutException):
        outcome = "timeout"
    except httpx.HTTPError as exc:
        outcome = type(exc).__name__
    out.latencies_s.append(time.perf_counter() - scheduled)
    if outcome == "ok":
        out.ok += 1
    elif outcome == "timeout":
        out.timeouts += 1
    else:
        out.errors += 1
        out.kinds[outcome] += 1


async def open_loop(
    clients: list[httpx.AsyncClient],
    requests: list[Request],
    rate: float,
    count: int,
    timeout_s: float,
) -> tuple[Window, float]:
    """Send ``count`` requests at ``rate``/s on a fixed schedule; wait for all.

    A task is created at each scheduled time (late if this loop is starved, in a
    burst to catch up) and never waits for earlier answers; requests go round-robin
    over ``clients``. Returns the outcomes and the wall time from the first
    scheduled send to the last answer.
    """
    out = Window()
    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter() + 0.05
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        req, client = requests[i % len(requests)], clients[i % len(clients)]
        tasks.append(asyncio.create_task(_one(client, req, due, timeout_s, out)))
    await asyncio.gather(*tasks)
    return out, time.perf_counter() - t0


def percentile_ms(sorted_s: np.ndarray, q: float) -> float | None:
    if sorted_s.size == 0:
        return None
    return round(float(np.percentile(sorted_s, q)) * 1000, 2)


async def measure(
    server: Server,
    db: str,
    endpoint: Endpoint,
    requests: list[Request],
    rates: list[float],
    args: argparse.Namespace,
) -> list[dict[str, object]]:
    """All rate windows of one endpoint; prints and returns one record each."""
    per_client = max(1, args.connections // args.clients)
    limits = httpx.Limits(
        max_connections=per_client, max_keepalive_connections=per_client
    )
    records: list[dict[str, object]] = []
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=server.base_url,
                    http2=False,
                    limits=limits,
                    timeout=httpx.Timeout(args.timeout),
                )
            )
            for _ in range(args.clients)
        ]
        for rate in rates:
            count = max(1, min(int(rate * args.duration), args.max_requests))
            log(f"{db} {endpoint.name}: {count} requests at {rate:g}/s")
            cpu_self, cpu_server = self_cpu_s(), proc_cpu_s(server.proc.pid)
            cpu_host = host_busy_s()
            window, wall = await open_loop(clients, requests, rate, count, args.timeout)
            cpu_self = self_cpu_s() - cpu_self
            cpu_server = proc_cpu_s(server.proc.pid) - cpu_server
            cpu_host = host_busy_s() - cpu_host
            if window.kinds:
                log(f"  failures: {dict(window.kinds)}")
            lat = np.sort(np.asarray(window.latencies_s))
            p95 = percentile_ms(lat, 95)
            record: dict[str, object] = {
                "bench": "api_load",
                "db": db,
                "endpoint": endpoint.name,
                "offered_rps": rate,
                "sent": count,
                "ok": window.ok,
                "errors": window.errors,
                "timeouts": window.timeouts,
                "achieved_rps": round(window.ok / wall, 1),
                "p50_ms": percentile_ms(lat, 50),
                "p95_ms": p95,
                "p99_ms": percentile_ms(lat, 99),
                "max_ms": percentile_ms(lat, 100),
                "loadgen_cpu_pct": round(100 * cpu_self / wall, 1),
                "server_cpu_pct": round(100 * cpu_server / wall, 1),
                "host_cpu_pct": round(100 * cpu_host / wall, 1),
                "target_p95_ms": endpoint.target_p95_ms,
                "meets_target": p95 is not None
                and p95 < endpoint.target_p95_ms
                and window.errors == 0
                and window.timeouts == 0,
            }
            print(json.dumps(record), flush=True)
            records.append(record)
            server.check_alive()
            await asyncio.sleep(args.pause)
    return records


def summary(db: str, endpoint: Endpoint, records: list[dict[str, object]]) -> None:
    meeting = [float(r["offered_rps"]) for r in records if r["meets_target"]]  # type: ignore[arg-type]
    at_target = [r for r in records if r["offered_rps"] == endpoint.target_rate]
    print(
        json.dumps(
            {
                "bench": "api_load_summary",
                "db": db,
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
    server: Server, keys: dict[str, str], detect_body: tuple[bytes, str]
) -> None:
    """First ``/detect`` exports the ONNX model (seconds); then a few of each."""
    viewer = {"Authorization": f"Bearer {keys['viewer']}"}
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
            r = http.get(f"{API}/categories", headers=viewer)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up list: {r.status_code} {r.text}")
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
        with serve(url, outputs, args.grace) as server:
            warm_up(server, keys, bodies[0])
            for name in args.endpoints:
                endpoint = ENDPOINTS[name]
                auth = {"Authorization": f"Bearer {keys[endpoint.role]}"}
                if name == "detect":
                    requests = [
                        Request("POST", endpoint.path, {**auth, "Content-Type": ct}, b)
                        for b, ct in bodies
                    ]
                else:
                    requests = [Request("GET", endpoint.path, auth)]
                records = asyncio.run(
                    measure(server, kind, endpoint, requests, rates[name], args)
                )
                summary(kind, endpoint, records)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Latency runs from each request's scheduled send time to the end of "
        "its response; percentiles are over every request sent. meets_target: "
        "p95 under the bound (list 20 ms, detect 50 ms) and no errors or timeouts. "
        "The load generator shares the CPU with the server: read the *_cpu_pct "
        "fields before reading the latencies.",
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
        default="list,detect",
        help="comma-separated, from: list (GET /api/v1/categories, viewer key), "
        "detect (POST /api/v1/detect, one 28x28 PNG, device key); default %(default)s",
    )
    ap.add_argument(
        "--rates",
        action="append",
        default=[],
        metavar="ENDPOINT=R1,R2,...",
        help="offered rates in requests/s for one endpoint (repeatable); defaults: "
        "list=50,100,200,400 detect=25,50,100",
    )
    ap.add_argument(
        "--duration", type=float, default=10.0, help="seconds per rate (default 10)"
    )
    ap.add_argument(
        "--max-requests",
        type=int,
        default=4000,
        help="at most this many requests per rate (default %(default)s)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="per-request limit in seconds, counted as a timeout (default 10)",
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=256,
        help="client connections in all (default %(default)s)",
    )
    ap.add_argument(
        "--clients",
        type=int,
        default=16,
        help="httpx.AsyncClient instances sharing --connections, requests "
        "round-robin: one pool of 256 spends the load generator's CPU finding "
        "connections once requests queue (default %(default)s)",
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
    for kind in args.db or ["sqlite", "postgres"]:
        run_db(kind, state, pngs, rates, args)
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
