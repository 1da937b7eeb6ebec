"""Run a scenario of ``simulations/scenarios/`` through the real app, and record it.

A scenario is a run-config TOML (what ``flwr run --run-config`` reads) plus a
federation size (``--federation-config num-supernodes=N``); no training code lives
here. This script starts a local SuperLink with its own outputs folder and catalog,
runs ``flwr run .``, and per round records central accuracy, nodes sampled and
replied, round time and the peak RSS of the SuperLink's whole process tree in that
round (server, simulation, Ray workers), so memory growth round over round shows.

    .venv/bin/python simulations/run_scenario.py clients-100
    .venv/bin/python simulations/run_scenario.py clients-500 --rounds 10
    .venv/bin/python simulations/run_scenario.py class-incremental-100

Writes ``outputs/scenarios/<name>.parquet`` and ``.png``; prints one JSON line per
round and a summary line. ``RAY_ADDRESS`` in the environment makes the simulation
join an existing Ray cluster instead of starting its own (README, "Simulating
hundreds of clients").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedobj.catalog import SyncCatalog
from fedobj.data.categories import FASHION_MNIST_NAMES
from fedobj.launch import RunWatch
from fedobj.monitor import TreeRss, parse_round_line
from fedobj.superlink import LocalSuperLink

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "simulations" / "scenarios"


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    grow_after: int | None = None  # add the last 4 categories after this round

    @property
    def toml(self) -> Path:
        return SCENARIOS / f"{self.name}.toml"


KNOWN = {
    s.name: s
    for s in (
        Scenario("clients-100", 100),
        Scenario("clients-500", 500),
        Scenario("class-incremental-100", 100, grow_after=5),
    )
}


@dataclass
class RoundRow:
    round: int
    central_accuracy: float
    nodes_sampled: int
    nodes_replied: int
    round_seconds: float
    wall_seconds: float
    peak_rss_mib: float
    catalog_classes: int  # categories in the catalog when the round was logged


def run_config(scenario: Scenario, extra: dict[str, Any]) -> str:
    """The scenario's TOML with ``extra`` on top, as ``k=v`` pairs.

    ``flwr run`` takes a TOML file or pairs, not both, and no key twice; this run
    adds its own database (and may change the rounds).
    """
    values = {**tomllib.loads(scenario.toml.read_text()), **extra}
    pairs = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


def run(
    scenario: Scenario,
    *,
    nodes: int,
    rounds: int | None,
    out: Path,
    ports: tuple[int, int],
) -> tuple[list[RoundRow], dict[str, Any]]:
    """Run ``scenario``; return its rows and summary (also written to ``out``)."""
    with tempfile.TemporaryDirectory(prefix="fedobj-scenario-") as tmp:
        db = Path(tmp) / "catalog.db"
        env = {"FEDOBJ_OUTPUTS_DIR": str(Path(tmp) / "outputs")}
        if os.environ.get("RAY_ADDRESS"):
            env["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
        link = LocalSuperLink(Path(tmp) / "flwr", ports[0], ports[1], env)
        extra: dict[str, Any] = {"database-url": f"sqlite:///{db}"}
        if rounds is not None:
            extra["num-server-rounds"] = rounds
        pid = link.start()
        rss = TreeRss(pid)
        rss.start()
        rows: list[RoundRow] = []
        t0 = time.time()
        proc = subprocess.Popen(
            link.run_command(ROOT, nodes, run_config(scenario, extra)),
            env=link.cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        tail: list[str] = []
        watch = RunWatch()
        outcome = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = (tail + [line])[-40:]
                watch.feed(line)
                parsed = parse_round_line(line)
                if parsed is None:
                    continue
                classes = 0
                if scenario.grow_after is not None:
                    catalog = SyncCatalog(db)
                    classes = catalog.snapshot().num_classes
                    if parsed.round == scenario.grow_after:
                        for name in FASHION_MNIST_NAMES[6:]:
                            catalog.add_category(name)
                row = RoundRow(
                    round=parsed.round,
                    central_accuracy=parsed.central_accuracy,
                    nodes_sampled=parsed.sampled,
                    nodes_replied=parsed.replied,
                    round_seconds=parsed.seconds,
                    wall_seconds=round(time.time() - t0, 1),
                    peak_rss_mib=round(rss.take_window_peak() / 1024, 1),
                    catalog_classes=classes,
                )
                rows.append(row)
                print(
                    json.dumps({"scenario": scenario.name, **asdict(row)}), flush=True
                )
            proc.wait(timeout=120)
            # flwr run --stream exits 0 for a failed run: ask the SuperLink
            outcome = watch.outcome(link.cli_env(), exit_code=proc.returncode)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            rss.stopped = True
            link.stop()
        if outcome is None or not outcome.completed or not rows:
            sys.stderr.write("".join(tail))
            why = outcome.describe() if outcome else f"exit {proc.returncode}"
            raise SystemExit(f"scenario {scenario.name} failed: {why}")
    summary = summarise(scenario, nodes, rows, rss.peak_kib / 1024)
    write(out, scenario.name, rows, summary)
    return rows, summary


def summarise(
    scenario: Scenario, nodes: int, rows: list[RoundRow], peak_mib: float
) -> dict[str, Any]:
    steady = rows[1:] or rows
    mean_round = sum(r.round_seconds for r in steady) / len(steady)
    # memory growth: last rounds against the first rounds after warm-up
    k = max(1, len(steady) // 4)
    early = max(r.peak_rss_mib for r in steady[:k])
    late = max(r.peak_rss_mib for r in steady[-k:])
    return {
        "scenario": scenario.name,
        "summary": True,
        "nodes": nodes,
        "rounds": len(rows),
        "final_accuracy": rows[-1].central_accuracy,
        "best_accuracy": max(r.central_accuracy for r in rows),
        "mean_round_seconds": round(mean_round, 2),
        "rounds_per_hour": round(3600 / mean_round, 1),
        "first_round_seconds": rows[0].round_seconds,
        "peak_rss_mib": round(peak_mib, 1),
        "rss_growth_mib": round(late - early, 1),
        "nodes_per_round": round(sum(r.nodes_replied for r in rows) / len(rows), 1),
    }


def write(out: Path, name: str, rows: list[RoundRow], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(r) for r in rows])
    pq.write_table(table, out / f"{name}.parquet")
    (out / f"{name}-summary.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    x = [r.round for r in rows]
    panels = (
        ("central accuracy", [r.central_accuracy for r in rows]),
        ("nodes replied", [r.nodes_replied for r in rows]),
        ("round time (s)", [r.round_seconds for r in rows]),
        ("peak RSS (MiB)", [r.peak_rss_mib for r in rows]),
    )
    for ax, (title, ys) in zip(axes, panels, strict=True):
        ax.plot(x, ys, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: {summary['nodes']} nodes")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(KNOWN))
    ap.add_argument("--nodes", type=int, help="override the federation size")
    ap.add_argument("--rounds", type=int, help="override num-server-rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "scenarios")
    ap.add_argument("--ports", type=int, nargs=2, default=(39591, 39593))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scenario = KNOWN[args.scenario]
    _, summary = run(
        scenario,
        nodes=args.nodes or scenario.nodes,
        rounds=args.rounds,
        out=args.out,
        ports=tuple(args.ports),
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
