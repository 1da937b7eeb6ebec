"""Scale benchmark: the 500-node scenario's round time, rounds per hour, peak RSS.

Runs ``simulations/scenarios/clients-500.toml`` (500 virtual SuperNodes, 50 sampled
per round, Dirichlet 0.3, ``cnn``) through the real app with
``simulations/run_scenario.py`` and prints one JSON line per figure: mean round
time after the first round, rounds per hour, the first round's time (Ray workers
start, data is loaded once per worker process), the peak RSS of the SuperLink's
whole process tree, and how much the per-round peak grew from the first quarter
of rounds to the last (it must not grow: no per-node state is kept across rounds).

    .venv/bin/python simulations/bench/scale.py [--rounds 10] [--nodes 500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "simulations"))

from run_scenario import KNOWN, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "scenarios")
    args = ap.parse_args()
    _, s = run(
        KNOWN["clients-500"],
        nodes=args.nodes,
        rounds=args.rounds,
        out=args.out,
        ports=(39691, 39693),
    )
    for figure, value, unit in (
        ("mean_round_seconds", s["mean_round_seconds"], "s"),
        ("rounds_per_hour", s["rounds_per_hour"], "1/h"),
        ("first_round_seconds", s["first_round_seconds"], "s"),
        ("peak_rss_mib", s["peak_rss_mib"], "MiB"),
        ("rss_growth_mib", s["rss_growth_mib"], "MiB"),
        ("final_accuracy", s["final_accuracy"], ""),
    ):
        print(
            json.dumps(
                {
                    "bench": "scale",
                    "nodes": args.nodes,
                    "rounds": s["rounds"],
                    "figure": figure,
                    "value": value,
                    "unit": unit,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
