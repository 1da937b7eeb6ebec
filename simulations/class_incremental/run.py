"""Class-incremental scenario: the catalog grows from 6 to 10 categories mid-run.

The catalog starts with the first 6 Fashion-MNIST categories; every node holds
images of all 10 (*shared*) or, in *disjoint*, 70% of nodes hold only the 6 old
categories and 30% only the 4 new ones (names not yet in the catalog are ignored).
While round ``--grow-after`` trains (its catalog snapshot taken), this script adds
the 4 new categories to the run's catalog through ``fedobj.catalog`` (what the admin
API calls), so the head grows at the next round, every time.

Variants: ``distill`` (grow, LwF distillation), ``no-distill`` (grow, none), ``joint``
(all 10 categories from round 1, same rounds). Per round, with the full head:
old-class accuracy (test images of the 6 old categories, argmax over every row),
new-class accuracy, all-class accuracy (a category the head lacks counts 0); and
the old categories scored over the 6 old rows only (forgetting, without the new
rows' competition).

    .venv/bin/python simulations/class_incremental/run.py --setting shared \\
        --variants distill no-distill joint

Writes ``outputs/class_incremental/<setting>.parquet`` and ``.png``; prints one JSON
line per variant and round, then one summary line per variant.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fedobj.catalog import SyncCatalog
from fedobj.config import check_keys, parse_overrides
from fedobj.data.categories import FASHION_MNIST_NAMES, FASHION_MNIST_SLUGS
from fedobj.data.fashion_mnist import ImageArrays
from fedobj.data.node_data import load_test_set
from fedobj.errors import ConfigError
from fedobj.launch import RunWatch
from fedobj.model import Checkpoint, load_checkpoint
from fedobj.superlink import LocalSuperLink
from fedobj.train import evaluate, map_to_class_map

ROOT = Path(__file__).resolve().parents[2]
OLD = 6
# The recipe each setting runs unless ``--recipe none``. ``all`` goes to every
# variant (joint included: the comparison is like for like); ``growth`` only to the
# variants whose head grows ({after} in it: the rounds left after the growth,
# rounds - grow-after - 1).
# disjoint: head calibration with virtual features (0.80-0.82 all-class against
# 0.64-0.71 without; joint on the same disjoint data 0.82 with it, 0.66-0.70
# without), statistics from every node's evaluation.
# shared: distillation in the growth round only (distill-rounds=1): the growth
# round is where an old category can be lost; in the rounds after it, distilling
# held the old classes 0.4-2.3 points lower (calibration cost 0.8 points there).
RECIPES: dict[str, dict[str, str]] = {
    "shared": {"all": "", "growth": "distill-rounds=1"},
    "disjoint": {
        "all": 'head-calibration="virtual-features" fraction-evaluate=1.0',
        "growth": "",
    },
}


def recipe_config(setting: str, variant: str, args: argparse.Namespace) -> str:
    """The run-config overrides of ``setting``'s recipe for ``variant``."""
    if args.recipe == "none":
        return ""
    recipe = RECIPES[setting]
    growth = recipe["growth"] if variant != "joint" else ""
    after = max(args.rounds - args.grow_after - 1, 1)
    return f"{recipe['all']} {growth.format(after=after)}".strip()


def merge_run_config(*parts: str) -> str:
    """Flower run-config strings merged, a later ``key=value`` replacing an
    earlier one (Flower refuses a key given twice); a retired or unknown key
    ends the script with the line that names it (Flower's own refusal does
    not)."""
    merged: dict[str, str] = {}
    for part in parts:
        pairs = re.findall(r'([^\s=]+)=("[^"]*"|\S+)', part)
        leftover = re.sub(r'([^\s=]+)=("[^"]*"|\S+)', "", part).strip()
        if leftover:
            raise SystemExit(f"run config: cannot read {leftover!r} in {part!r}")
        merged.update(pairs)
    text = " ".join(f"{k}={v}" for k, v in merged.items())
    try:
        check_keys(parse_overrides(text))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    return text


def class_accuracies(metrics: dict[str, float]) -> tuple[float, float, float]:
    """(old, new, all) from a version's per-class accuracies (missing class = 0)."""
    per = [float(metrics.get(f"class-{k}-accuracy", 0.0)) for k in range(10)]
    return sum(per[:OLD]) / OLD, sum(per[OLD:]) / (10 - OLD), sum(per) / 10


@functools.lru_cache(maxsize=2)
def _test_set(channels: int, size: int) -> ImageArrays:
    return load_test_set("", channels, size)


def old_rows_accuracy(checkpoint: Checkpoint) -> float:
    """Old-class accuracy with the old rows only (argmax over the 6 categories the
    catalog started with): what the model still knows of them, without the new
    rows' competition. A drop here is forgetting; a drop in ``old_accuracy``
    alone is old images taken for the new look-alikes."""
    class_map = checkpoint.class_map
    old = [class_map.slug_to_index[slug] for slug in FASHION_MNIST_SLUGS[:OLD]]
    args = checkpoint.model_args
    data = map_to_class_map(_test_set(args.in_channels, args.image_size), class_map)
    res = evaluate(checkpoint.build(), data.tensors, old)
    return sum(res.per_class_accuracy[k] for k in old) / OLD


def scenario_run_config(
    variant: str, setting: str, seed: int, args: argparse.Namespace, db: Path
) -> str:
    """The run config of one variant's run: the scenario, the setting's recipe,
    the user's overrides, then what makes the variant what it is."""
    return merge_run_config(
        f"num-server-rounds={args.rounds} min-nodes={args.nodes} "
        f'database-url="sqlite:///{db}" partitioner="iid" '
        f"initial-categories={10 if variant == 'joint' else OLD} distill-weight=1.0 "
        f'class-split="{"disjoint" if setting == "disjoint" else "none"}" '
        # every variant splits at the same class: joint trains on the same
        # nodes' same images (it split at 10 until 2026-11-23: IID on 7 nodes)
        f"split-first-new={OLD} seed={seed}",
        recipe_config(setting, variant, args),
        args.run_config,
        # what makes the variant what it is wins over any override
        "distill-weight=0.0" if variant != "distill" else "",
    )


def run_variant(
    variant: str, setting: str, seed: int, args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    db = tmp / f"{setting}-{variant}-{seed}.db"
    link = LocalSuperLink(
        tmp / "flwr", 39491, 39493, {"FEDOBJ_OUTPUTS_DIR": str(tmp / "outputs")}
    )
    link.start()
    run_config = scenario_run_config(variant, setting, seed, args, db)
    # the run's own output, kept: a failed run must say why
    run_log = args.out / f"{args.name or setting}-{variant}-{seed}.log"
    with run_log.open("wb") as out:
        proc = subprocess.Popen(
            link.run_command(ROOT, args.nodes, run_config),
            env=link.cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    catalog = SyncCatalog(db)
    grown = variant == "joint"
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if grown:
                continue
            # round R's row is written after its catalog snapshot: categories
            # added while round R trains are in round R+1's snapshot, always
            # (waiting for round R's version raced round R+1's snapshot, so the
            # growth landed at R+1 or R+2 by chance until 2026-11-23)
            try:
                done = any(
                    r.round >= args.grow_after
                    for run in catalog.list_runs()
                    for r in catalog.rounds(run.run_id)
                )
            except Exception:  # the run is still creating its catalog
                done = False
            if done:
                for name in FASHION_MNIST_NAMES[OLD:]:
                    catalog.add_category(name)
                grown = True
        # flwr run --stream exits 0 for a failed run: ask the SuperLink
        watch = RunWatch()
        for line in run_log.read_text(errors="replace").splitlines():
            watch.feed(line)
        outcome = watch.outcome(link.cli_env(), exit_code=proc.returncode)
    finally:
        if proc.poll() is None:
            proc.kill()
        link.stop()
    if not outcome.completed:
        tail = run_log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(
            f"{setting}/{variant}: {outcome.describe()}; the last lines "
            f"of {run_log}:\n" + "\n".join(tail)
        )
    rows = []
    for v in sorted(catalog.list_versions(), key=lambda v: v.round):
        old, new, all_ = class_accuracies(v.metrics)
        checkpoint = load_checkpoint(v.checkpoint_uri)
        row = {
            "setting": setting,
            "variant": variant,
            "seed": seed,
            "round": v.round,
            "classes": v.class_map.num_classes,
            "old_accuracy": round(old, 4),
            "old_rows_accuracy": round(old_rows_accuracy(checkpoint), 4),
            "new_accuracy": round(new, 4),
            "all_accuracy": round(all_, 4),
        }
        # per class too: which category holds the gap (missing class = 0)
        row |= {
            f"class_{k}_accuracy": round(
                float(v.metrics.get(f"class-{k}-accuracy", 0.0)), 4
            )
            for k in range(10)
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final accuracies and the old-class drop after the head grew.

    The reference is the last round before growth (its head had 6 rows, so its
    old-class accuracy is 6-way; after growth it is 10-way, a harder task: compare
    with ``joint``, which is 10-way throughout).
    """
    grew = next(
        (i for i, r in enumerate(rows) if r["classes"] > rows[0]["classes"]), None
    )
    before = rows[grew - 1]["old_accuracy"] if grew else None
    after = [r["old_accuracy"] for r in rows[grew:]] if grew else []
    # the same drop with the old rows only: forgetting (same 6-way task before)
    after_rows = [r["old_rows_accuracy"] for r in rows[grew:]] if grew else []
    return {
        "setting": rows[0]["setting"],
        "variant": rows[0]["variant"],
        "seed": rows[0]["seed"],
        "grew_at_round": rows[grew]["round"] if grew else None,
        "final_all_accuracy": rows[-1]["all_accuracy"],
        "final_old_accuracy": rows[-1]["old_accuracy"],
        "final_new_accuracy": rows[-1]["new_accuracy"],
        "old_accuracy_before_growth": before,
        "max_old_drop_after_growth": round(before - min(after), 4) if after else None,
        "max_old_rows_drop_after_growth": (
            round(before - min(after_rows), 4) if after_rows else None
        ),
        "mean_all_last_3": round(sum(r["all_accuracy"] for r in rows[-3:]) / 3, 4),
    }


def aggregate(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (min, max) over seeds of each variant's summary figures."""
    out = []
    for variant in dict.fromkeys(s["variant"] for s in summaries):
        runs = [s for s in summaries if s["variant"] == variant]
        agg: dict[str, Any] = {"variant": variant, "seeds": [s["seed"] for s in runs]}
        for key in (
            "final_all_accuracy",
            "final_old_accuracy",
            "final_new_accuracy",
            "max_old_drop_after_growth",
            "max_old_rows_drop_after_growth",
            "mean_all_last_3",
        ):
            values = [float(s[key]) for s in runs if s[key] is not None]
            if values:
                agg[key] = {
                    "mean": round(sum(values) / len(values), 4),
                    "min": min(values),
                    "max": max(values),
                }
        out.append(agg)
    return out


def plot(rows: list[dict[str, Any]], path: Path, grow_after: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, key in zip(
        axes, ("old_accuracy", "new_accuracy", "all_accuracy"), strict=True
    ):
        for variant in sorted({str(r["variant"]) for r in rows}):
            by_round: dict[int, list[float]] = {}
            for r in rows:
                if r["variant"] == variant:
                    by_round.setdefault(int(r["round"]), []).append(float(r[key]))
            rounds = sorted(by_round)
            mean = [sum(by_round[k]) / len(by_round[k]) for k in rounds]
            (line,) = ax.plot(rounds, mean, marker="o", label=variant)
            ax.fill_between(  # spread over seeds
                rounds,
                [min(by_round[k]) for k in rounds],
                [max(by_round[k]) for k in rounds],
                color=line.get_color(),
                alpha=0.2,
            )
        ax.axvline(grow_after + 0.5, color="grey", linestyle=":")
        ax.set(title=key.replace("_", " "), xlabel="round")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=("shared", "disjoint"), default="shared")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["distill", "no-distill", "joint"],
        choices=("distill", "no-distill", "joint"),
    )
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--grow-after", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="run seeds")
    ap.add_argument(
        "--recipe",
        choices=("default", "none"),
        default="default",
        help="default: the setting's recommended run config (RECIPES); none: bare",
    )
    ap.add_argument("--run-config", default="", help="extra run-config overrides")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "class_incremental")
    ap.add_argument("--name", default="", help="output file stem (default: setting)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    summaries = []
    with tempfile.TemporaryDirectory(prefix="fedobj-cil-") as tmp:
        for variant in args.variants:
            for seed in args.seeds:
                variant_rows = run_variant(variant, args.setting, seed, args, Path(tmp))
                rows += variant_rows
                summaries.append(summarise(variant_rows))
                print(json.dumps({"summary": summaries[-1]}), flush=True)
    stem = args.name or args.setting
    pq.write_table(pa.Table.from_pylist(rows), args.out / f"{stem}.parquet")
    plot(rows, args.out / f"{stem}.png", args.grow_after)
    report = {"runs": summaries, "over_seeds": aggregate(summaries)}
    (args.out / f"{stem}-summary.json").write_text(json.dumps(report, indent=2))
    for agg in report["over_seeds"]:
        print(json.dumps({"over_seeds": agg}), flush=True)


if __name__ == "__main__":
    main()
