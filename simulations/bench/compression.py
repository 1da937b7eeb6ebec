"""Benchmark: what the edge link saves, and what it costs in accuracy.

One invocation runs the same federation once per mode, each with ``flwr run``
(Ray simulation) on a SuperLink this script starts and stops: full
Fashion-MNIST, 10 nodes, Dirichlet(0.5) with fedobj's partitioner and seed,
FedAvg with full participation, one local epoch, the cosine learning-rate
schedule over the rounds; centralised accuracy on the 10,000 test images after
every round. Modes (``--modes``): ``none`` (the baseline, dense float32 both
ways), ``int8``, ``topk10`` and ``topk1`` (top-k 10% / 1% with error feedback),
``int8-down`` (int8 up, int8 deltas down).

Bytes are what Flower's ``message_size_mod`` counts (``ArrayRecord.count_bytes``:
array bytes plus names, and the config and metric records), per node and round,
read from the run's ``metrics.parquet`` (``up_bytes``/``down_bytes`` of the train
exchange). The link model gives each device 2 Mbit/s up and 10 Mbit/s down: a
round lasts as long as its slowest node's download + training + upload; the time
to ``--target`` accuracy adds those rounds up (measured training seconds, so on
a busy machine every mode pays the same noise).

First, ``codec`` lines: one real update (``--model`` after one local epoch on one
node's images), encoded by each codec: bytes raw and with zstd (level 3, each
array its own frame), the milliseconds encoding and zstd take, and the
server's milliseconds per reply to read, check and fold it (``none``: the dense
streaming mean's).

Output (stdout): one JSON line per codec, per mode and round, and per mode a
summary ``{"bench": "compression", "mode", "uplink_reduction", "final_accuracy",
"accuracy_vs_none", "link_time_to_target_s", ...}``; the last line compares
against the targets of issue 20 (int8 >= 3.9x within 0.3 points; top-k >= 20x
within 1 point; compressed reaches the target sooner over the link).

    .venv/bin/python simulations/bench/compression.py                 # cnn, 20 rounds
    .venv/bin/python simulations/bench/compression.py --model mobilenet_v3_small \\
        --rounds 6 --modes none int8 topk10 --extra 'batch-size=64 lr=0.05'
    .venv/bin/python simulations/bench/compression.py --rounds 2 --modes none int8

Needs the full dataset (Debian package dataset-fashion-mnist). About 7 minutes
a mode for ``cnn`` over 20 rounds on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODES: dict[str, str] = {
    "none": "",
    "int8": 'update-compression="int8"',
    "topk10": 'update-compression="topk" topk-fraction=0.1',
    "topk1": 'update-compression="topk" topk-fraction=0.01',
    "int8-down": 'update-compression="int8" downlink-compression="int8"',
}
UP_BPS = 2e6 / 8
DOWN_BPS = 10e6 / 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emit(**fields: Any) -> None:
    print(json.dumps({"bench": "compression", **fields}), flush=True)


def codec_lines(model: str, image_size: int) -> None:
    """Bytes and milliseconds of each codec on one real update."""
    import numpy as np
    import torch

    from apps.link_records import pack, unpack
    from fedobj.aggregation import StreamingMean
    from fedobj.compression import CompressedMean, Layout, encode_int8, read_update
    from fedobj.compression.codec import encode_topk_feedback
    from fedobj.data.fashion_mnist import load_fashion_mnist
    from fedobj.model.factory import ModelArgs, build_model
    from fedobj.train import LabelledTensors, TrainConfig, train

    torch.manual_seed(0)
    data = load_fashion_mnist("train")
    n = 2000
    images = torch.as_tensor(data.images[:n])  # uint8, N x 1 x 28 x 28
    if image_size > 28:
        pad = (image_size - 28) // 2
        images = torch.nn.functional.pad(images, (pad, image_size - 28 - pad) * 2)
    labels = torch.as_tensor(data.labels[:n]).long()
    args = ModelArgs(name=model, num_classes=10, in_channels=1, image_size=image_size)
    net = build_model(args)
    before = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    train(net, LabelledTensors(images, labels), TrainConfig(epochs=1, lr=0.03))
    after = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    layout = Layout.of(before)
    delta = layout.flatten(after) - layout.flatten(before)
    dense = layout.size * 4
    rng = np.random.default_rng(0)
    cases = {
        "int8": lambda: encode_int8(delta, layout, rng),
        "topk10": lambda: encode_topk_feedback(
            delta, np.zeros_like(delta), layout, 0.1, rng
        )[0],
        "topk1": lambda: encode_topk_feedback(
            delta, np.zeros_like(delta), layout, 0.01, rng
        )[0],
    }
    replies = 20
    reference = {k: np.ascontiguousarray(v) for k, v in before.items()}
    t0 = time.perf_counter()
    dense_mean = StreamingMean(reference)
    for _ in range(replies):
        dense_mean.add(after, 10.0)
    dense_mean.result()
    emit(
        figure="codec",
        model=model,
        codec="none",
        dense_bytes=dense,
        fold_ms_per_reply=round((time.perf_counter() - t0) * 1000 / replies, 2),
    )
    for name, encode in cases.items():
        t0 = time.perf_counter()
        arrays = encode()
        t1 = time.perf_counter()
        record = pack(arrays)
        t2 = time.perf_counter()
        raw = sum(a.nbytes for a in arrays.values())
        packed = record.count_bytes()
        codec = "int8" if name == "int8" else "topk"
        t3 = time.perf_counter()
        mean = CompressedMean(layout, layout.flatten(reference))
        for _ in range(replies):
            mean.add(read_update(unpack(record, dense * 2), codec, layout), 10.0)
        mean.result()
        fold_ms = (time.perf_counter() - t3) * 1000 / replies
        emit(
            figure="codec",
            model=model,
            codec=name,
            dense_bytes=dense,
            raw_bytes=raw,
            zstd_bytes=packed,
            raw_reduction=round(dense / raw, 2),
            zstd_reduction=round(dense / packed, 2),
            encode_ms=round((t1 - t0) * 1000, 2),
            zstd_ms=round((t2 - t1) * 1000, 2),
            fold_ms_per_reply=round(fold_ms, 2),  # read, check, inflate, fold
        )


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One ``flwr run`` of ``mode``; the rows of its metrics.parquet."""
    import pyarrow.parquet as pq

    from fedobj.superlink import LocalSuperLink

    outputs = work / mode / "outputs"
    link = LocalSuperLink(
        work / mode / "flwr-home",
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(outputs),
            "FEDOBJ_CACHE_DIR": str(work / mode / "cache"),
        },
    )
    config = (
        f"num-server-rounds={args.rounds} min-nodes={args.nodes} "
        f'model="{args.model}" image-size={args.image_size} '
        f'partitioner="dirichlet" dirichlet-alpha=0.5 fraction-evaluate=0.1 '
        f"lr-schedule-rounds={args.rounds} {args.extra} {MODES[mode]}"
    )
    link.start()
    try:
        t0 = time.time()
        proc = subprocess.run(
            link.run_command(ROOT, args.nodes, config),
            env=link.cli_env(),
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        log = proc.stdout + proc.stderr
        last = f"round {args.rounds}/{args.rounds}:"
        if proc.returncode != 0 or last not in log:
            tail = log.strip().splitlines()[-5:]
            raise SystemExit(f"compression bench: mode {mode} failed: {tail}")
        print(f"{mode}: {time.time() - t0:.0f} s", file=sys.stderr)
    finally:
        link.stop()
    return pq.read_table((outputs / "latest" / "metrics.parquet").resolve()).to_pylist()


def summarise(mode: str, rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    rounds = sorted((r for r in rows if r["kind"] == "round"), key=lambda r: r["round"])
    train = [r for r in rows if r["kind"] == "node-train" and r["up_bytes"]]
    link_s = 0.0
    reached: float | None = None
    for r in rounds:
        nodes = [t for t in train if t["round"] == r["round"]]
        slowest = max(
            t["down_bytes"] / DOWN_BPS + (t["seconds"] or 0.0) + t["up_bytes"] / UP_BPS
            for t in nodes
        )
        link_s += slowest
        emit(
            figure="round",
            mode=mode,
            round=r["round"],
            central_accuracy=r["central_accuracy"],
            up_bytes_per_node=round(sum(t["up_bytes"] for t in nodes) / len(nodes)),
            down_bytes_per_node=round(sum(t["down_bytes"] for t in nodes) / len(nodes)),
            link_round_s=round(slowest, 2),
        )
        if reached is None and (r["central_accuracy"] or 0) >= target:
            reached = link_s
    return {
        "mode": mode,
        "up_bytes_per_node_round": sum(t["up_bytes"] for t in train) / len(train),
        "down_bytes_per_node_round": sum(t["down_bytes"] for t in train) / len(train),
        "final_accuracy": rounds[-1]["central_accuracy"],
        "link_time_to_target_s": None if reached is None else round(reached, 1),
        "link_time_all_rounds_s": round(link_s, 1),
        "train_seconds_per_node_round": round(
            sum(t["seconds"] or 0.0 for t in train) / len(train), 2
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--image-size", type=int, default=0, help="0: 28 (cnn), 32")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per mode")
    ap.add_argument("--skip-codec", action="store_true")
    ap.add_argument(
        "--extra",
        default="",
        help="run config for every mode (conf/mobilenet-small.toml's: "
        "'batch-size=64 lr=0.05')",
    )
    args = ap.parse_args()
    if "none" not in args.modes:
        raise SystemExit("compression bench: --modes must include the baseline none")
    args.image_size = args.image_size or (28 if args.model == "cnn" else 32)
    if not args.skip_codec:
        codec_lines(args.model, args.image_size)
    with tempfile.TemporaryDirectory(prefix="compression-bench-") as tmp:
        results = {
            m: summarise(m, run_mode(m, args, Path(tmp)), args.target)
            for m in args.modes
        }
    base = results["none"]
    checks: dict[str, bool] = {}
    for mode, res in results.items():
        res["uplink_reduction"] = round(
            base["up_bytes_per_node_round"] / res["up_bytes_per_node_round"], 2
        )
        res["downlink_reduction"] = round(
            base["down_bytes_per_node_round"] / res["down_bytes_per_node_round"], 2
        )
        res["accuracy_vs_none"] = round(
            res["final_accuracy"] - base["final_accuracy"], 4
        )
        emit(figure="summary", model=args.model, rounds=args.rounds, **res)
        if mode == "none":
            continue
        ratio, gap = (3.9, 0.003) if mode.startswith("int8") else (20.0, 0.01)
        checks[f"{mode}_bytes"] = res["uplink_reduction"] >= ratio
        checks[f"{mode}_accuracy"] = res["accuracy_vs_none"] >= -gap
        t, t0 = res["link_time_to_target_s"], base["link_time_to_target_s"]
        checks[f"{mode}_sooner"] = t is not None and (t0 is None or t < t0)
    emit(figure="targets", model=args.model, met=all(checks.values()), **checks)


if __name__ == "__main__":
    main()
