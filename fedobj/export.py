"""Checkpoints to ONNX (fp32, static INT8) and ORT format, each checked against torch.

Three formats: ``onnx`` (fp32), ``onnx-int8`` (static QDQ, calibrated on local
images) and ``ort``, the *mobile* artifact: the INT8 model converted to ONNX
Runtime's ORT format for ONNX Runtime Mobile (as onnxruntime's
``convert_onnx_models_to_ort`` tool writes it, see :func:`convert_to_ort`). An
export is only handed out after it agrees with
the checkpoint it came from (:data:`FP32_RULE`, :data:`INT8_RULE`, :data:`ORT_RULE`),
measured through the very code that serves it (:class:`fedobj.inference.Predictor`),
so preprocessing written into the file is checked too. Every file is
self-contained (no external ``.data`` weights) and carries in its metadata the
class map, the version name, the model arguments and the preprocessing: whoever
serves it never guesses (STYLE.md rule 4).
Pure: the caller stores the bytes and records them (see :mod:`fedobj.serving`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.data.node_data import adapt_images
from fedobj.errors import DatasetNotFoundError, FedObjError
from fedobj.inference import (
    META_CLASS_MAP,
    META_MODEL_ARGS,
    META_PREPROCESSING,
    META_VERSION,
    Predictor,
    Preprocessing,
    is_ort_format,
)
from fedobj.model.checkpoint import Checkpoint
from fedobj.train import PIXEL_MEAN, PIXEL_STD, to_input

log = logging.getLogger(__name__)
for _chatty in ("onnxscript", "onnx_ir"):  # INFO per optimisation pass otherwise
    logging.getLogger(_chatty).setLevel(logging.WARNING)

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "onnx-int8", "ort")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MIN_OPSET = 17  # the oldest opset exported and tested here; onnxruntime runs 17-21
RANDOM_PARITY_IMAGES = 64  # parity batch when no real images are at hand
_EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so trace with 2
_CALIBRATION_BATCH = 32
# Weight-heavy ops, where INT8 pays; normalisation and pooling stay float.
_QUANTISED_OPS = ["Conv", "Gemm", "MatMul"]


class ExportError(FedObjError):
    """A checkpoint cannot be exported as asked (format, inputs, exporter)."""


class ExportParityError(ExportError):
    """An export disagrees with its checkpoint beyond the rule; never handed out."""


@dataclass(frozen=True)
class ParityRule:
    """What an export must meet against torch on the same images."""

    max_abs_diff: float | None  # on the logits; None: not bounded (INT8)
    min_top1_agreement: float

    def describe(self) -> str:
        top1 = f"top-1 agreement >= {self.min_top1_agreement:.1%}"
        if self.max_abs_diff is None:
            return top1
        return f"max |logit diff| <= {self.max_abs_diff:g} and {top1}"


# fp32 runs the same maths in another order: only rounding may differ.
FP32_RULE = ParityRule(max_abs_diff=1e-4, min_top1_agreement=0.995)
# INT8 moves logits by design; what must hold is the answer people see.
INT8_RULE = ParityRule(max_abs_diff=None, min_top1_agreement=0.98)
# The ORT file is the INT8 model with its fusions baked in: same rule, re-checked.
ORT_RULE = INT8_RULE

ORT_TARGETS = ("arm", "amd64")
MOBILE_TARGET = "arm"  # phones; "amd64" would bake in x86-only NCHWc kernels
# What the mobile artifact should weigh (bytes, 1 MB = 10^6 B): judged and recorded,
# not refused, because only parity makes an export wrong. The cnn has no budget.
MOBILE_SIZE_BUDGET: dict[str, int] = {
    "mobilenet_v3_small": 2_000_000,
    "mobilenet_v3_large": 5_000_000,
}


@dataclass(frozen=True)
class ParityReport:
    """How an export compared with torch; ``max_abs_diff`` is measured either way."""

    max_abs_diff: float | None
    top1_agreement: float
    n: int
    passed: bool
    rule: str


@dataclass(frozen=True)
class ExportResult:
    """The exported bytes and the parity of every step that made them.

    ``parity`` is the last step's (the file handed out); ``steps`` holds each
    step's report by format (``onnx`` then ``onnx-int8`` then ``ort``).
    """

    fmt: str
    data: bytes
    parity: ParityReport
    steps: dict[str, ParityReport] = field(default_factory=dict)


def export_onnx(ckpt: Checkpoint, *, version_name: str, opset: int = 18) -> bytes:
    """The checkpoint's model as one self-contained ONNX file with fedobj metadata.

    Input ``image``: float32 ``(N, C, H, W)``, already normalised (the metadata's
    ``fedobj.preprocessing`` says how); output ``logits``: ``(N, num_classes)``.
    The batch dimension is dynamic. torch's dynamo exporter is tried first; a model
    it cannot handle falls back to the TorchScript exporter, with a log line.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset must be >= {MIN_OPSET}, got {opset}")
    args = ckpt.model_args
    model = ckpt.build()
    example = torch.zeros(
        _EXAMPLE_BATCH, args.in_channels, args.image_size, args.image_size
    )
    try:
        proto = _export_dynamo(model, example, opset)
    except Exception as exc:  # the exporter raises many types; any means fall back
        log.warning(
            "dynamo ONNX export of %s failed (%s: %s); falling back to the "
            "TorchScript exporter (dynamo=False)",
            args.name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        proto = _export_torchscript(model, example, opset)
    external = [
        t.name
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(f"export left weights outside the file: {external[:3]}")
    preprocessing = Preprocessing(
        image_size=args.image_size,
        channels=args.in_channels,
        mean=PIXEL_MEAN,
        std=PIXEL_STD,
    )
    _set_metadata(
        proto,
        {
            META_CLASS_MAP: ckpt.class_map.to_json(),
            META_VERSION: version_name,
            META_MODEL_ARGS: json.dumps(args.to_dict(), sort_keys=True),
            META_PREPROCESSING: preprocessing.to_json(),
        },
    )
    return bytes(proto.SerializeToString())


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, opset: int
) -> onnx.ModelProto:
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    if program is None:  # only when writing to a file, which we never ask for
        raise ExportError("the dynamo exporter returned no program")
    # Serialising the in-memory program embeds every weight (no external data).
    proto: onnx.ModelProto = program.model_proto
    return proto


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, opset: int
) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="fedobj-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        return onnx.load(str(path), load_external_data=True)


def _set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set ``props`` in ``metadata_props``, keeping any other entry there."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in props}
    del proto.metadata_props[:]
    for key, value in {**kept, **props}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    """Feeds normalised calibration batches to onnxruntime's calibrator."""

    def __init__(self, x: np.ndarray, input_name: str) -> None:
        self._batches = iter(
            [
                {input_name: x[i : i + _CALIBRATION_BATCH]}
                for i in range(0, len(x), _CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(onnx_fp32: bytes, calibration: np.ndarray) -> bytes:
    """Static INT8 (QDQ) quantisation of an :func:`export_onnx` file.

    ``calibration``: uint8 ``(N, C, H, W)`` pixels, normalised as the file's
    metadata says. Convolutions and linear layers get per-channel INT8 weights
    and INT8 activations with MinMax ranges, except the classifier: its output is
    the logits themselves, and quantising it flipped 2-4% of top-1 answers of a
    lightly trained CNN against <1% with it left in float (it is ~1% of weights).
    The metadata of ``onnx_fp32`` is copied to the result.
    """
    fp32 = onnx.load_from_string(onnx_fp32)
    meta = {p.key: p.value for p in fp32.metadata_props}
    if META_PREPROCESSING not in meta:
        raise ExportError("quantize_int8 needs an export_onnx file (no metadata)")
    pre = Preprocessing.from_json(meta[META_PREPROCESSING])
    _check_images(calibration, pre.channels, pre.image_size, "calibration")
    x = pre.normalise(calibration)
    with tempfile.TemporaryDirectory(prefix="fedobj-quant-") as tmp:
        src, prepared, out = (Path(tmp) / n for n in ("fp32", "pre", "int8"))
        src.write_bytes(onnx_fp32)
        # Shape inference and graph fusions first, as onnxruntime recommends:
        # the quantiser needs shapes to place Q/DQ pairs on every tensor.
        quant_pre_process(str(src), str(prepared))
        prepared_proto = onnx.load(str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            _Calibration(x, prepared_proto.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=_QUANTISED_OPS,
            nodes_to_exclude=_head_nodes(prepared_proto),
            calibrate_method=CalibrationMethod.MinMax,
        )
        int8 = onnx.load(str(out), load_external_data=True)
    _set_metadata(int8, meta)
    return bytes(int8.SerializeToString())


def _head_nodes(proto: onnx.ModelProto) -> list[str]:
    """Name of the last Conv/Gemm/MatMul before the output (the classifier)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    tensor = proto.graph.output[0].name
    while tensor in producers:
        node = producers[tensor]
        if node.op_type in _QUANTISED_OPS:
            return [node.name] if node.name else []
        if not node.input:
            break
        tensor = node.input[0]
    return []


def convert_to_ort(onnx_model: bytes, *, target_platform: str = MOBILE_TARGET) -> bytes:
    """An ONNX model as an ORT-format model for ONNX Runtime (Mobile).

    The same steps as onnxruntime's ``convert_onnx_models_to_ort`` tool with
    ``--optimization_style Fixed``: load with graph optimisations on, save the
    optimised graph as ORT format. For ``"arm"`` (phones) INT8 QDQ pairs may fuse
    into INT8 kernels (``session.qdqisint8allowed``) at ORT_ENABLE_EXTENDED: the
    portable fusions. The tool's default, ORT_ENABLE_ALL, adds layout rewrites
    (NHWC) that are hardware-specific and made MobileNetV3-Small's file 2.01 MB
    instead of 1.95 MB, over its 2 MB budget. ``"amd64"`` (a file optimised for
    an x86 server) uses ORT_ENABLE_ALL with NCHWc. ORT format keeps
    ``metadata_props``, so the class map and preprocessing travel in the file as
    with ONNX.
    """
    if target_platform not in ORT_TARGETS:
        raise ExportError(
            f"target platform must be one of {ORT_TARGETS}, got {target_platform!r}"
        )
    with tempfile.TemporaryDirectory(prefix="fedobj-ort-") as tmp:
        out = Path(tmp) / "model.ort"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the tool's notes are noise here
        arm = target_platform == "arm"
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            if arm
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        options.optimized_model_filepath = str(out)
        options.add_session_config_entry("session.save_model_format", "ORT")
        options.add_session_config_entry(
            "session.qdqisint8allowed", "1" if arm else "0"
        )
        try:
            ort.InferenceSession(
                onnx_model,
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=["NchwcTransformer"] if arm else None,
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ExportError(f"ORT-format conversion failed: {exc}") from exc
        data = out.read_bytes()
    if not is_ort_format(data):
        raise ExportError("ORT-format conversion wrote no ORT model")
    return data


def torch_logits(reference: Checkpoint | nn.Module, images: np.ndarray) -> np.ndarray:
    """Logits torch computes for uint8 ``(N, C, H, W)`` images (a module is put in
    eval mode), normalised the way training does it."""
    model = reference.build() if isinstance(reference, Checkpoint) else reference
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = to_input(torch.tensor(images[start : start + 256]))
            out.append(model(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def check_parity(
    onnx_model: bytes,
    reference: Checkpoint | nn.Module,
    images: np.ndarray,
    rule: ParityRule = FP32_RULE,
    *,
    classes: list[int] | None = None,
) -> ParityReport:
    """Compare an export with torch on uint8 ``images`` (served the real way).

    Top-1 agreement counts the ``classes`` rows only (default: all), because a
    served prediction is the best among the active categories; the logit
    difference is over every row.
    """
    if len(images) == 0:
        raise ExportError("parity needs at least one image")
    ours, _ = Predictor.from_bytes(onnx_model).logits(images)
    theirs = torch_logits(reference, images)
    if ours.shape != theirs.shape:
        raise ExportParityError(
            f"export gives logits of shape {ours.shape}, torch {theirs.shape}"
        )
    rows = classes if classes else list(range(theirs.shape[1]))
    max_abs = float(np.abs(ours - theirs).max())
    agree = float(
        np.mean(ours[:, rows].argmax(axis=1) == theirs[:, rows].argmax(axis=1))
    )
    passed = agree >= rule.min_top1_agreement and (
        rule.max_abs_diff is None or max_abs <= rule.max_abs_diff
    )
    return ParityReport(max_abs, agree, len(images), passed, rule.describe())


def require_parity(report: ParityReport, what: str) -> None:
    """Raise :class:`ExportParityError` with the numbers unless ``report`` passed."""
    if not report.passed:
        raise ExportParityError(
            f"{what} export failed its parity check against torch on {report.n} "
            f"images: max |logit diff| = {report.max_abs_diff:.3g}, top-1 "
            f"agreement = {report.top1_agreement:.2%} (rule: {report.rule})"
        )


def export_artifact(
    ckpt: Checkpoint,
    fmt: str,
    *,
    version_name: str,
    calibration: np.ndarray | None,
) -> ExportResult:
    """Export ``ckpt`` as ``fmt`` (one of :data:`EXPORT_FORMATS`), parity-checked.

    ``calibration`` (uint8 ``(N, C, H, W)``, e.g. :func:`calibration_images`) sets
    INT8 ranges and is the parity batch; ``onnx`` without it checks on seeded
    random pixels instead. Every step on the way is checked (fp32, then INT8, then
    the ORT file), so a failure names the step that broke.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    args = ckpt.model_args
    has_images = calibration is not None and len(calibration) > 0
    if fmt != "onnx" and not has_images:
        raise ExportError(
            f"{fmt} needs calibration images and none were found: point "
            "FEDOBJ_FASHION_MNIST_DIR at Fashion-MNIST or pass calibration images"
        )
    if calibration is not None and has_images:
        images = calibration
        _check_images(images, args.in_channels, args.image_size, "calibration")
    else:
        images = np.random.default_rng(0).integers(
            0,
            256,
            (RANDOM_PARITY_IMAGES, args.in_channels, args.image_size, args.image_size),
            dtype=np.uint8,
        )
    classes = ckpt.class_map.active_indices or None
    reference = ckpt.build()
    fp32 = export_onnx(ckpt, version_name=version_name)
    report = check_parity(fp32, reference, images, FP32_RULE, classes=classes)
    require_parity(report, "onnx")
    steps = {"onnx": report}
    if fmt == "onnx":
        return ExportResult(fmt, fp32, report, steps)
    int8 = quantize_int8(fp32, images)
    report = check_parity(int8, reference, images, INT8_RULE, classes=classes)
    require_parity(report, "onnx-int8")
    steps["onnx-int8"] = report
    if fmt == "onnx-int8":
        return ExportResult(fmt, int8, report, steps)
    mobile = convert_to_ort(int8)
    report = check_parity(mobile, reference, images, ORT_RULE, classes=classes)
    require_parity(report, "ort")
    steps["ort"] = report
    budget = MOBILE_SIZE_BUDGET.get(args.name)
    if budget is not None and len(mobile) > budget:
        log.warning(
            "mobile artifact of %s is %d bytes, over its %d-byte budget",
            args.name,
            len(mobile),
            budget,
        )
    return ExportResult(fmt, mobile, report, steps)


def _check_images(images: np.ndarray, channels: int, size: int, what: str) -> None:
    expected = (channels, size, size)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ExportError(
            f"{what} images must be uint8 (N, {channels}, {size}, {size}), got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ExportError(f"{what} images are empty")


def calibration_images(
    image_size: int, channels: int, n: int = 256
) -> np.ndarray | None:
    """``n`` held-out Fashion-MNIST test images as uint8 ``(n, channels, size, size)``.

    The test split is never trained on, so INT8 ranges and parity are measured on
    images the model has not memorised; a seeded sample keeps classes mixed and
    exports reproducible. None when Fashion-MNIST is not installed.
    """
    try:
        data = load_fashion_mnist("test")
    except DatasetNotFoundError:
        log.info("no Fashion-MNIST test split found; no calibration images")
        return None
    picked = np.sort(np.random.default_rng(0).permutation(len(data))[:n])
    return adapt_images(data.images[picked], channels, image_size)
