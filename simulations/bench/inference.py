"""Benchmark: batch-1 inference latency, model size and top-1 agreement per format.

    .venv/bin/python simulations/bench/inference.py
    .venv/bin/python simulations/bench/inference.py --models cnn --repeats 100

For each model (``cnn`` at 28x28 grey, trained here for ``--epochs`` on
``--train-images`` Fashion-MNIST images; ``mobilenet_v3_small`` and
``mobilenet_v3_large`` at 224x224 RGB with random weights, which is fine for
latency and size) it exports the real artifacts through ``fedobj.export`` and
measures, on ONE thread (torch and ONNX
Runtime), the median batch-1 run time of:

- ``torch``: torch eager fp32;
- ``ort_fp32``: the fp32 ONNX file with fedobj's serving options (ORT_ENABLE_ALL),
  and session-option variants of it: ``ort_fp32_extended`` (ORT_ENABLE_EXTENDED),
  ``ort_fp32_offline`` (optimised once for this CPU and saved in ORT format, as a
  server could), ``ort_fp32_denormal_zero`` (``session.set_denormal_as_zero``),
  ``ort_fp32_no_mem_pattern``, ``ort_fp32_no_spin`` (intra-op spinning off);
- ``ort_int8_static``: static QDQ INT8 (the ``onnx-int8`` artifact);
- ``ort_int8_dynamic``: onnxruntime's dynamic quantisation (INT8 weights only);
- ``ort_mobile``: the mobile artifact (``ort``: INT8 in ORT format, ARM target),
  timed here on x86 only for reference.

Variants are timed round-robin (``--rounds`` rounds of ``--repeats`` runs each)
and the median over rounds is reported, so drift on a shared machine hits all
alike. Then sizes, top-1 agreement with torch on held-out Fashion-MNIST test
images (resized), the server artifact ``fedobj.serving`` would choose (fp32 or
INT8 static, fastest batch-1, INT8 needing a 5% lead) and whether the targets
hold. One JSON line per figure on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fedobj.data.categories import fashion_mnist_class_map  # noqa: E402
from fedobj.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from fedobj.data.node_data import adapt_images  # noqa: E402
from fedobj.export import (  # noqa: E402
    INT8_RULE,
    MOBILE_SIZE_BUDGET,
    convert_to_ort,
    export_onnx,
    quantize_int8,
    torch_logits,
)
from fedobj.inference import Preprocessing  # noqa: E402
from fedobj.model import Checkpoint, ModelArgs, build_model  # noqa: E402
from fedobj.serving import SERVER_MARGIN  # noqa: E402
from fedobj.train import LabelledTensors, TrainConfig, train  # noqa: E402

SHAPES = {  # model -> (channels, image size) as the issue asks
    "cnn": (1, 28),
    "mobilenet_v3_small": (3, 224),
    "mobilenet_v3_large": (3, 224),
}
G = ort.GraphOptimizationLevel


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def session(data: bytes, level: Any = G.ORT_ENABLE_ALL, **cfg: str) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if data[4:8] == b"ORTM":
        options.add_session_config_entry("session.load_model_format", "ORT")
    for key, value in cfg.items():
        if key == "enable_mem_pattern":
            options.enable_mem_pattern = value == "1"
        else:
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def trained_cnn(epochs: int, n_images: int) -> Checkpoint:
    args = ModelArgs("cnn", num_classes=10, in_channels=1, image_size=28)
    torch.manual_seed(0)
    model = build_model(args)
    data = load_fashion_mnist("train")
    data = data.subset(np.arange(min(n_images, len(data))))
    torch.set_num_threads(2)  # training may use both cores; timing uses one
    t0 = time.perf_counter()
    train(
        model,
        LabelledTensors(torch.tensor(data.images), torch.tensor(data.labels)),
        TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=0),
    )
    torch.set_num_threads(1)
    note(
        f"cnn: trained {epochs} epoch(s) on {len(data)} images in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return Checkpoint(args, fashion_mnist_class_map(), model.state_dict())


def dynamic_int8(fp32: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("a.onnx", "b.onnx", "c.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre))
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
        return out.read_bytes()


def time_round_robin(
    runners: dict[str, Callable[[], object]], repeats: int, rounds: int
) -> dict[str, float]:
    for run in runners.values():  # warm-up: first runs allocate and pack weights
        for _ in range(3):
            run()
    medians: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            medians[name].append(1000 * statistics.median(times))
    return {k: statistics.median(v) for k, v in medians.items()}


def top1(sess: Any, x: np.ndarray) -> np.ndarray:
    out = [sess.run(None, {"image": x[i : i + 32]})[0] for i in range(0, len(x), 32)]
    return np.concatenate(out).argmax(axis=1)


def bench_model(name: str, opts: argparse.Namespace) -> None:
    channels, size = SHAPES[name]
    if name == "cnn":
        ckpt = trained_cnn(opts.epochs, opts.train_images)
    else:
        args = ModelArgs(name, num_classes=10, in_channels=channels, image_size=size)
        torch.manual_seed(0)
        ckpt = Checkpoint(
            args, fashion_mnist_class_map(), build_model(args).state_dict()
        )
    test = load_fashion_mnist("test")
    n_cal, n_eval = 256, opts.eval_images if name == "cnn" else opts.eval_images // 5
    calibration = adapt_images(test.images[:n_cal], channels, size)
    held_out = adapt_images(test.images[-n_eval:], channels, size)
    pre = Preprocessing(image_size=size, channels=channels)

    t0 = time.perf_counter()
    fp32 = export_onnx(ckpt, version_name="bench")
    int8 = quantize_int8(fp32, calibration)
    files = {
        "ort_fp32": fp32,
        "ort_fp32_offline": convert_to_ort(fp32, target_platform="amd64"),
        "ort_int8_static": int8,
        "ort_int8_dynamic": dynamic_int8(fp32),
        "ort_mobile": convert_to_ort(int8),
    }
    note(f"{name}: exported in {time.perf_counter() - t0:.0f} s")
    sessions = {
        "ort_fp32": session(fp32),
        "ort_fp32_extended": session(fp32, G.ORT_ENABLE_EXTENDED),
        "ort_fp32_offline": session(files["ort_fp32_offline"]),
        "ort_fp32_denormal_zero": session(
            fp32, **{"session.set_denormal_as_zero": "1"}
        ),
        "ort_fp32_no_mem_pattern": session(fp32, enable_mem_pattern="0"),
        "ort_fp32_no_spin": session(fp32, **{"session.intra_op.allow_spinning": "0"}),
        "ort_int8_static": session(int8),
        "ort_int8_dynamic": session(files["ort_int8_dynamic"]),
        "ort_mobile": session(files["ort_mobile"]),
    }
    model = ckpt.build().eval()
    x_u8 = held_out[:1]
    x = pre.normalise(x_u8)
    xt = torch.from_numpy(x)

    def torch_run() -> object:
        with torch.no_grad():
            return model(xt)

    runners: dict[str, Callable[[], object]] = {"torch": torch_run}
    for key, sess in sessions.items():
        runners[key] = lambda s=sess: s.run(None, {"image": x})
    latency = time_round_robin(runners, opts.repeats, opts.rounds)
    for variant, ms in latency.items():
        emit(
            model=name,
            figure="latency_ms",
            variant=variant,
            batch=1,
            input=f"{channels}x{size}x{size}",
            threads=1,
            value=round(ms, 4),
        )
    for variant, data in files.items():
        emit(model=name, figure="size_bytes", variant=variant, value=len(data))
    reference = torch_logits(model, held_out).argmax(axis=1)
    x_eval = pre.normalise(held_out)
    agreement = {}
    for variant in ("ort_fp32", "ort_int8_static", "ort_int8_dynamic", "ort_mobile"):
        agreement[variant] = float(
            np.mean(top1(sessions[variant], x_eval) == reference)
        )
        emit(
            model=name,
            figure="top1_agreement",
            variant=variant,
            weights="trained" if name == "cnn" else "random",
            n=len(held_out),
            value=round(agreement[variant], 4),
        )

    fp32_ms = latency["ort_fp32"]
    server = "ort_fp32"
    if latency["ort_int8_static"] < fp32_ms * (1 - SERVER_MARGIN):
        server = "ort_int8_static"
    best_option = min((k for k in latency if k.startswith("ort_fp32")), key=latency.get)
    budget = MOBILE_SIZE_BUDGET.get(name)
    mobile_size = len(files["ort_mobile"])
    emit(
        model=name,
        figure="summary",
        server_choice=server,
        server_vs_ort_fp32=round(latency[server] / fp32_ms, 3),
        server_target_met=latency[server] <= fp32_ms,
        fastest_fp32_session_variant=best_option,
        fastest_fp32_variant_vs_plain=round(latency[best_option] / fp32_ms, 3),
        torch_vs_ort_fp32=round(latency["torch"] / fp32_ms, 2),
        mobile_size_bytes=mobile_size,
        mobile_size_budget=budget,
        mobile_size_met=None if budget is None else mobile_size <= budget,
        mobile_agreement=round(agreement["ort_mobile"], 4),
        mobile_agreement_met=agreement["ort_mobile"] >= INT8_RULE.min_top1_agreement,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=30, help="runs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="cnn training epochs")
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument(
        "--eval-images",
        type=int,
        default=1000,
        help="agreement images (a fifth for MobileNets)",
    )
    opts = parser.parse_args()
    torch.set_num_threads(1)
    emit(
        figure="setup",
        onnxruntime=ort.__version__,
        torch=torch.__version__,
        cpus=os.cpu_count(),
        threads=1,
    )
    for name in opts.models.split(","):
        bench_model(name.strip(), opts)


if __name__ == "__main__":
    main()
