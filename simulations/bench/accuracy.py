"""Benchmark: rounds and wall time to 90% Fashion-MNIST test accuracy.

10 simulated nodes, Dirichlet(0.5) over the full training set, model `cnn`, one local
epoch per round, through the real app (`flwr run .` on a SuperLink this script starts
and stops). Prints one JSON line per round, then a final line with rounds-to-target,
wall time and peak RSS (the SuperLink's whole process tree, sampled every 0.5 s).

    .venv/bin/python simulations/bench/accuracy.py [--rounds 30] [--target 0.90]

Needs the full dataset (Debian package dataset-fashion-mnist or
FEDOBJ_FASHION_MNIST_DIR). Stops the run as soon as the target is reached.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedobj.launch import RunWatch
from fedobj.monitor import TreeRss, parse_round_line
from fedobj.superlink import LocalSuperLink

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--run-config", default="", help="extra run-config overrides")
    args = ap.parse_args()
    # SIGTERM (and SIGINT, ignored in background jobs) must still run the cleanup below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory(prefix="fedobj-bench-") as tmp:
        link = LocalSuperLink(
            Path(tmp) / "flwr",
            39391,
            39393,
            {"FEDOBJ_OUTPUTS_DIR": str(Path(tmp) / "outputs")},
        )
        pid = link.start()
        rss = TreeRss(pid)
        rss.start()
        # The learning-rate schedule anneals over 20 rounds (the target's horizon);
        # the run may go on to --rounds at the final rate.
        run_config = (
            f"num-server-rounds={args.rounds} min-nodes={args.nodes} "
            f'partitioner="dirichlet" dirichlet-alpha=0.5 model="cnn" '
            f"local-epochs=1 lr-schedule-rounds=20 {args.run_config}"
        )
        t0 = time.time()
        proc = subprocess.Popen(
            link.run_command(ROOT, args.nodes, run_config),
            env=link.cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reached, last_round, round_secs = None, 0, []
        watch, failure = RunWatch(), None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                watch.feed(line)
                parsed = parse_round_line(line)
                if parsed is None:
                    continue
                r, acc = parsed.round, parsed.central_accuracy
                secs = parsed.seconds
                last_round = r
                round_secs.append(secs)
                print(
                    json.dumps(
                        {
                            "round": r,
                            "central_accuracy": acc,
                            "central_loss": parsed.central_loss,
                            "nodes_replied": parsed.replied,
                            "round_seconds": secs,
                            "wall_seconds": round(time.time() - t0, 1),
                        }
                    ),
                    flush=True,
                )
                if acc >= args.target:
                    reached = r
                    break
            if reached is None:  # the run ended by itself: did it complete?
                proc.wait()
                outcome = watch.outcome(link.cli_env(), exit_code=proc.returncode)
                failure = None if outcome.completed else outcome.describe()
        finally:
            wall = time.time() - t0
            proc.kill()
            proc.wait()
            rss.stopped = True
            link.stop()
        if failure is not None:
            print(json.dumps({"error": failure}), flush=True)
            raise SystemExit(1)
        if last_round == 0:
            print(
                json.dumps(
                    {
                        "error": "no round line was parsed: did the run fail, "
                        "or did the ServerApp's log format change?"
                    }
                )
            )
        steady = round_secs[1:] or round_secs
        print(
            json.dumps(
                {
                    "metric": "rounds_to_target",
                    "target": args.target,
                    "rounds_to_target": reached,
                    "rounds_run": last_round,
                    "wall_seconds_to_target": round(wall, 1) if reached else None,
                    "mean_round_seconds_after_first": round(
                        sum(steady) / len(steady), 2
                    )
                    if steady
                    else None,
                    "peak_rss_mib": round(rss.peak_kib / 1024, 1),
                    "nodes": args.nodes,
                    "run_config": run_config,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
