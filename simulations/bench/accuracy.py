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
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedobj.superlink import LocalSuperLink, descendants

ROOT = Path(__file__).resolve().parents[2]
ROUND_LINE = re.compile(
    r"round (\d+)/(\d+): (\d+)/(\d+) nodes replied.*?train loss ([\d.na/]+), "
    r"central accuracy ([\d.]+) \(loss ([\d.]+)\)(?:, version \S+)?, ([\d.]+) s"
)


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRss(threading.Thread):
    """Samples the summed RSS of a process tree; keeps the peak."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.peak_kib, self.stopped = root_pid, 0, False

    def run(self) -> None:
        while not self.stopped:
            pids = {self.root_pid} | descendants(self.root_pid)
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(p) for p in pids))
            time.sleep(0.5)


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
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = ROUND_LINE.search(line)
                if not m:
                    continue
                r, acc, secs = int(m.group(1)), float(m.group(6)), float(m.group(8))
                last_round = r
                round_secs.append(secs)
                print(
                    json.dumps(
                        {
                            "round": r,
                            "central_accuracy": acc,
                            "central_loss": float(m.group(7)),
                            "nodes_replied": int(m.group(3)),
                            "round_seconds": secs,
                            "wall_seconds": round(time.time() - t0, 1),
                        }
                    ),
                    flush=True,
                )
                if acc >= args.target:
                    reached = r
                    break
        finally:
            wall = time.time() - t0
            proc.kill()
            proc.wait()
            rss.stopped = True
            link.stop()
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
