"""Benchmark: how long the web console's pages take, and what idle live updates cost.

Pages are rendered on the server from the catalog, so their time grows with what it
holds. This fills a temporary outputs folder with months' worth (50 categories; 100
versions, each with per-class accuracy and a 50-class confusion matrix, sharing one
real checkpoint; a 100-round run with 10 nodes' results; 10,000 detections; an
admin key), starts a real ``fedobj admin serve --rate-limit 0`` on 127.0.0.1 and
signs in with ``POST /login``.

    .venv/bin/python simulations/bench/console_pages.py               # both dbs
    .venv/bin/python simulations/bench/console_pages.py --db sqlite --repeats 10

Page time: each page is fetched ``--repeats`` times in a row after 3 warm-ups by
one client on one keep-alive connection, timed from send to last body byte: on
loopback with nothing queued, the server's time plus well under a millisecond of
httpx (the server is not instrumented). Target: under 100 ms.

Idle live cost: while anyone listens to ``/events``, one watcher task per process
reads a fingerprint of the training tables twice a second. Server CPU (utime +
stime, ``/proc/<pid>/stat``) over ``--window-s`` with no browser (the baseline),
then with 50 idle SSE streams open. Target: under 2 % of one core.

One JSON line per figure on stdout, progress on stderr; every process, folder and
PostgreSQL schema made here is removed, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import numpy as np

from fedobj.adminproc import serve_admin
from fedobj.apikeys import ENV_SECRET, hash_token, load_secret, new_token
from fedobj.catalog import Catalog, SyncCatalog
from fedobj.data.categories import FASHION_MNIST_NAMES
from fedobj.model.checkpoint import Checkpoint
from fedobj.model.factory import ModelArgs, build_model
from fedobj.registry import ArtifactStore

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CATEGORIES, VERSIONS, NODES, DETECTIONS = 50, 100, 10, 10_000  # a round each
CONFUSIONS_PER_ROW = 10  # off-diagonal cells per true class: a mediocre 50-class head
RUN_ID = "bench-run"
PAGES = (
    f"/ /catalog /versions /versions/v{VERSIONS:04d} /runs /runs/{RUN_ID} /nodes"
    " /detect /detections /audit"
).split()
DETECTION_BATCH, WARM_UPS, SSE_CONNECTIONS = 500, 3, 50
PAGE_TARGET_MS, SSE_TARGET_PCT = 100.0, 2.0


def log(msg: str) -> None:
    print(f"[console_pages] {msg}", file=sys.stderr, flush=True)


@contextmanager
def database(kind: str, tmp: Path, pg_admin: str) -> Iterator[str]:
    """An empty database URL of ``kind``; a PostgreSQL schema is dropped after."""
    if kind == "sqlite":
        yield f"sqlite://{tmp / 'catalog.db'}"
        return

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    schema = f"fedobj_bench_{os.urandom(6).hex()}"
    asyncio.run(admin(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{pg_admin}?search_path={schema}"
    finally:
        asyncio.run(admin(f'DROP SCHEMA "{schema}" CASCADE'))


def version_metrics(rng: np.random.Generator, accuracy: float) -> dict[str, float]:
    """Accuracy, loss, ``class-<i>-accuracy`` and ``confusion-<t>-<p>`` cells."""
    metrics = {"accuracy": accuracy, "loss": 2.0 * (1.0 - accuracy)}
    for t in range(CATEGORIES):
        metrics[f"class-{t}-accuracy"] = float(rng.uniform(0.5, 1.0))
        for p in rng.choice(CATEGORIES, CONFUSIONS_PER_ROW, replace=False):
            metrics[f"confusion-{t}-{p}"] = float(rng.integers(1, 20))
        metrics[f"confusion-{t}-{t}"] = float(rng.integers(100, 200))
    return metrics


async def fill(catalog: Catalog, uri: str, sha: str, size: int) -> None:
    """Versions, the run with its rounds and node results, the detections."""
    rng = np.random.default_rng(0)
    class_map = await catalog.snapshot()
    await catalog.begin_run(
        RUN_ID, strategy="fedavg", model="cnn", first_round=1, last_round=VERSIONS
    )
    for node in range(NODES):
        await catalog.upsert_node(node, samples=600, label_names=["t-shirt-top"])
    rec = catalog.record_node_round
    for r in range(1, VERSIONS + 1):
        await catalog.start_round(RUN_ID, r, NODES)
        bad = int(r % 10 == 0)  # a node refused now and then, as in real runs
        for n in range(NODES):
            err = "shape: head mismatch" if n < bad else None
            await rec(RUN_ID, r, n, "train", num_examples=600, error=err, loss=0.5)
            acc = float(rng.uniform(0.6, 0.9))
            await rec(RUN_ID, r, n, "evaluate", num_examples=100, accuracy=acc)
        acc = 0.5 + 0.4 * r / VERSIONS
        await catalog.finish_round(
            RUN_ID, r, replied=NODES - bad, rejected=bad, accuracy=acc, loss=1 - acc
        )
        await catalog.register_version(
            run_id=RUN_ID,
            round=r,
            class_map=class_map,
            metrics=version_metrics(rng, acc),
            checkpoint_uri=uri,
            checkpoint_sha256=sha,
            size_bytes=size,
        )
    await catalog.end_run(RUN_ID, "completed")
    names = [e.name for e in class_map.entries]
    for start in range(0, DETECTIONS, DETECTION_BATCH):
        batch = []
        for i in range(start, min(start + DETECTION_BATCH, DETECTIONS)):
            top = int(rng.integers(CATEGORIES))
            preds = [
                {"object_name": names[c], "confidence": p, "class_index": c}
                for c, p in ((top, 0.8), ((top + 1) % CATEGORIES, 0.1))
            ]
            det = {"predictions": preds, "detected": True, "inference_time_ms": 1.5}
            batch.append((f"{i:064x}", det))
        name = f"v{int(rng.integers(1, VERSIONS + 1)):04d}"
        await catalog.record_detections("bench-device", name, batch)


def prepare(url: str, outputs: Path) -> str:
    """Migrate and fill the catalog; return an admin key's token."""
    catalog = SyncCatalog(url)
    catalog.migrate()
    catalog.seed_categories()
    for i in range(len(FASHION_MNIST_NAMES), CATEGORIES):
        catalog.add_category(f"category {i}", "added by the bench", actor="cli:bench")
    class_map = catalog.snapshot()
    args = ModelArgs(num_classes=class_map.num_classes)
    state = {k: v.detach() for k, v in build_model(args).state_dict().items()}
    art = ArtifactStore(outputs).save_checkpoint(
        f"{RUN_ID}/model.pt", Checkpoint(args, class_map, state)
    )
    asyncio.run(fill(catalog.aio, art.uri, art.sha256, art.size))
    key = new_token()
    secret = load_secret(outputs / "api-secret")
    catalog.create_api_key(key.key_id, hash_token(secret, key.token), "admin", "bench")
    return key.token


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def emit(figure: str, **fields: object) -> None:
    print(json.dumps({"figure": figure, **fields}), flush=True)


def time_pages(http: httpx.Client, repeats: int, db: str) -> None:
    """One JSON line per page: median and p95 wall time of ``repeats`` GETs."""
    for path in PAGES:
        ms = []
        for i in range(WARM_UPS + repeats):
            t0 = time.perf_counter()
            resp = http.get(path).raise_for_status()  # a redirect to /login too
            if i >= WARM_UPS:
                ms.append((time.perf_counter() - t0) * 1000)
        emit(
            "page_ms",
            page=path,
            median_ms=round(float(np.median(ms)), 2),
            p95_ms=round(float(np.percentile(ms, 95)), 2),
            target_ms=PAGE_TARGET_MS,
            db=db,
            kib=round(len(resp.content) / 1024, 1),
        )


async def cpu_pct(pid: int, window_s: float) -> float:
    """The process's CPU over the next ``window_s``, in per cent of one core."""
    cpu0, t0 = proc_cpu_s(pid), time.monotonic()
    await asyncio.sleep(window_s)
    return 100 * (proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)


def raise_ended(tasks: list[asyncio.Task[None]]) -> None:
    """A stream's task ends only by failing: say why."""
    for task in tasks:
        if task.done():
            task.result()


async def sse_cpu_pct(
    base_url: str, cookies: httpx.Cookies, pid: int, window_s: float
) -> float:
    """Open ``SSE_CONNECTIONS`` streams to ``/events``; once each has had its
    first event, the server's CPU over ``window_s`` (per cent of one core)."""
    opened: set[int] = set()
    n = SSE_CONNECTIONS

    async def listen(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("GET", "/events") as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    opened.add(i)
        raise RuntimeError("an /events stream ended")

    limits = httpx.Limits(max_connections=n)  # one connection per stream
    async with httpx.AsyncClient(
        base_url=base_url, cookies=cookies, timeout=None, limits=limits
    ) as client:
        tasks = [asyncio.create_task(listen(client, i)) for i in range(n)]
        try:
            async with asyncio.timeout(30):  # bounds the opening; streams have none
                while len(opened) < n:
                    await asyncio.sleep(0.05)
                    raise_ended(tasks)
            pct = await cpu_pct(pid, window_s)
            raise_ended(tasks)
            return pct
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def run_db(kind: str, args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="fedobj-console-") as tmp_name,
        database(kind, Path(tmp_name), args.postgres_url) as url,
    ):
        outputs = Path(tmp_name)  # the catalog file, the secret, the artifacts
        t0 = time.perf_counter()
        token = prepare(url, outputs)
        log(f"{kind}: catalog filled in {time.perf_counter() - t0:.1f} s")
        with serve_admin(outputs, url, cwd=ROOT) as server:
            pid = server.proc.pid
            log(f"{kind}: server pid {pid} on {server.base_url}")
            with httpx.Client(base_url=server.base_url, timeout=60) as http:
                resp = http.post("/login", data={"key": token, "next": "/"})
                if resp.status_code != 303 or not http.cookies:
                    raise RuntimeError(f"sign-in: {resp.status_code} {resp.text[:300]}")
                time_pages(http, args.repeats, kind)
                cookies = http.cookies
            time.sleep(1.0)  # let the last requests' work settle
            log(f"{kind}: CPU idle, then with SSE streams, {args.window_s:g} s each")
            baseline = asyncio.run(cpu_pct(pid, args.window_s))
            sse = asyncio.run(sse_cpu_pct(server.base_url, cookies, pid, args.window_s))
            server.check_alive()
        emit(
            "idle_sse_cpu_pct",
            connections=SSE_CONNECTIONS,
            cpu_pct_of_core=round(sse, 2),
            baseline_cpu_pct_of_core=round(baseline, 2),
            target_pct=SSE_TARGET_PCT,
            db=kind,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--db", action="append", choices=("sqlite", "postgres"), help="repeatable")
    pg = os.environ.get("FEDOBJ_TEST_POSTGRES_URL", DEFAULT_PG)
    add("--postgres-url", default=pg, help="a schema is made and dropped there")
    add("--repeats", type=int, default=30, help="timed GETs per page (30)")
    add("--window-s", type=float, default=20.0, help="CPU window, seconds (20)")
    args = ap.parse_args()
    os.environ.pop(ENV_SECRET, None)  # keys and server: the outputs' secret file
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still clean up
    for kind in args.db or ["sqlite", "postgres"]:
        run_db(kind, args)


if __name__ == "__main__":
    main()
