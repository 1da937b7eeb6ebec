"""ONNX export: metadata, a dynamic batch, one self-contained file, parity, INT8.

Real models from the factory, a real (short) training run on the Fashion-MNIST
fixture, the real exporters and onnxruntime; nothing is mocked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fedobj.classmap import ClassEntry, ClassMap
from fedobj.data import fashion_mnist
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.errors import FedObjError
from fedobj.export import (
    EXPORT_FORMATS,
    FP32_RULE,
    INT8_RULE,
    ORT_RULE,
    ExportError,
    ExportParityError,
    calibration_images,
    check_parity,
    convert_to_ort,
    export_artifact,
    export_onnx,
    quantize_int8,
    require_parity,
    torch_logits,
)
from fedobj.inference import Predictor, Preprocessing, is_ort_format
from fedobj.model import Checkpoint, ModelArgs, build_model
from fedobj.train import LabelledTensors, TrainConfig, train

ARGS = ModelArgs("cnn", num_classes=10, in_channels=1, image_size=28, norm="group")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Two threads on a shared 2-core machine are several times slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> Checkpoint:
    """A CNN after ~280 SGD steps on the fixture (~75% test accuracy, ~4 s)."""
    torch.manual_seed(0)
    data = load_fashion_mnist("train")
    model = build_model(ARGS)
    train(
        model,
        LabelledTensors(torch.tensor(data.images), torch.tensor(data.labels)),
        TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0),
    )
    return Checkpoint(ARGS, fashion_mnist_class_map(), model.state_dict(), round=3)


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    images = calibration_images(28, 1)
    assert images is not None
    return images


@pytest.fixture(scope="module")
def fp32(trained: Checkpoint) -> bytes:
    return export_onnx(trained, version_name="v-test")


def test_fp32_round_trip_carries_metadata(fp32: bytes, trained: Checkpoint) -> None:
    proto = onnx.load_from_string(fp32)
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ClassMap.from_json(meta["fedobj.class_map"]) == trained.class_map
    assert meta["fedobj.version"] == "v-test"
    assert ModelArgs.from_dict(json.loads(meta["fedobj.model_args"])) == ARGS
    pre = Preprocessing.from_json(meta["fedobj.preprocessing"])
    assert (pre.image_size, pre.channels, pre.mean, pre.std) == (28, 1, 0.5, 0.5)
    assert pre.pixel_scale == pytest.approx(1 / 255)
    assert (pre.resize, pre.layout) == ("bilinear", "NCHW")
    assert max(o.version for o in proto.opset_import if o.domain == "") >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("image", "logits")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]


@pytest.mark.parametrize("batch", [1, 7])
def test_fp32_parity_with_a_dynamic_batch(
    fp32: bytes, trained: Checkpoint, calibration: np.ndarray, batch: int
) -> None:
    images = calibration[:batch]
    ours, _ = Predictor.from_bytes(fp32).logits(images)
    assert ours.shape == (batch, 10)
    np.testing.assert_allclose(ours, torch_logits(trained, images), atol=1e-4)
    report = check_parity(fp32, trained, images)
    assert report.passed and report.n == batch and report.top1_agreement == 1.0
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4


def test_export_is_one_self_contained_file(fp32: bytes, tmp_path: Path) -> None:
    proto = onnx.load_from_string(fp32)
    assert proto.graph.initializer, "weights must be initializers in the file"
    assert all(
        t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer
    )
    lonely = tmp_path / "alone" / "model.onnx"  # nothing beside it
    lonely.parent.mkdir()
    lonely.write_bytes(fp32)
    session = ort.InferenceSession(str(lonely), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": np.zeros((3, 1, 28, 28), np.float32)})
    assert out.shape == (3, 10)
    assert sorted(p.name for p in lonely.parent.iterdir()) == ["model.onnx"]


def test_export_artifact_onnx_without_images_checks_random_pixels(
    trained: Checkpoint,
) -> None:
    result = export_artifact(trained, "onnx", version_name="v1", calibration=None)
    assert result.fmt == "onnx" and result.parity.passed
    assert result.parity.n == 64 and result.parity.rule == FP32_RULE.describe()
    assert Predictor.from_bytes(result.data).model_version == "v1"


def test_int8_export_agrees_with_torch(
    trained: Checkpoint, calibration: np.ndarray, fp32: bytes
) -> None:
    result = export_artifact(
        trained, "onnx-int8", version_name="v1", calibration=calibration
    )
    report = result.parity
    assert report.passed and report.n == len(calibration)
    assert report.top1_agreement >= INT8_RULE.min_top1_agreement
    assert report.rule == INT8_RULE.describe()
    proto = onnx.load_from_string(result.data)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        n.op_type for n in proto.graph.node
    }
    assert len(result.data) < len(fp32) / 2  # INT8 weights: about a quarter
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fedobj.version"] == "v1"
    assert ClassMap.from_json(meta["fedobj.class_map"]) == trained.class_map
    # Also on images it was not calibrated on (the test split's other images).
    held_out = load_fashion_mnist("test").images[-300:]
    other = check_parity(result.data, trained, held_out, INT8_RULE)
    assert other.top1_agreement >= 0.97, other


def test_ort_mobile_export_is_int8_in_ort_format_with_metadata(
    trained: Checkpoint, calibration: np.ndarray, fp32: bytes, tmp_path: Path
) -> None:
    result = export_artifact(trained, "ort", version_name="v2", calibration=calibration)
    assert is_ort_format(result.data) and not is_ort_format(fp32)
    assert list(result.steps) == ["onnx", "onnx-int8", "ort"]
    assert all(r.passed for r in result.steps.values())
    assert result.parity is result.steps["ort"] and result.parity.rule == (
        ORT_RULE.describe()
    )
    assert result.parity.top1_agreement >= ORT_RULE.min_top1_agreement
    assert len(result.data) < len(fp32) / 2  # INT8 weights
    # The ORT file keeps the metadata: the predictor reads it as from ONNX.
    predictor = Predictor.from_bytes(result.data)
    assert predictor.class_map == trained.class_map
    assert predictor.model_version == "v2"
    assert predictor.preprocessing.image_size == 28
    ours = predictor.predict_arrays(calibration[:32], top_k=1)
    theirs = torch_logits(trained, calibration[:32]).argmax(axis=1)
    assert np.mean([d.predictions[0].class_index for d in ours] == theirs) >= 0.9
    # A plain onnxruntime session opens the file from disk too (no fedobj needed).
    path = tmp_path / "model.ort"
    path.write_bytes(result.data)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["fedobj.version"] == "v2"


def test_int8_needs_calibration_images(trained: Checkpoint) -> None:
    for fmt in ("onnx-int8", "ort"):
        for calibration in (None, np.zeros((0, 1, 28, 28), np.uint8)):
            with pytest.raises(ExportError, match="calibration"):
                export_artifact(
                    trained, fmt, version_name="v1", calibration=calibration
                )


def test_quantize_refuses_mismatched_calibration(fp32: bytes) -> None:
    with pytest.raises(ExportError, match=r"uint8 \(N, 1, 28, 28\)"):
        quantize_int8(fp32, np.zeros((4, 3, 28, 28), np.uint8))


def test_parity_failure_raises_with_the_numbers(
    fp32: bytes, trained: Checkpoint, calibration: np.ndarray
) -> None:
    torch.manual_seed(1)
    perturbed = Checkpoint(
        ARGS,
        trained.class_map,
        {k: v + 0.05 * torch.randn_like(v) for k, v in trained.state_dict.items()},
    )
    report = check_parity(fp32, perturbed, calibration[:64])
    assert not report.passed
    assert report.max_abs_diff is not None and report.max_abs_diff > 1e-4
    with pytest.raises(ExportParityError) as info:
        require_parity(report, "onnx")
    message = str(info.value)
    assert f"{report.max_abs_diff:.3g}" in message
    assert f"{report.top1_agreement:.2%}" in message and "on 64 images" in message
    assert isinstance(info.value, FedObjError)


def test_top1_agreement_counts_only_the_given_classes(
    fp32: bytes, trained: Checkpoint, calibration: np.ndarray
) -> None:
    zero_head = dict(trained.state_dict)
    zero_head["classifier.weight"] = torch.zeros_like(zero_head["classifier.weight"])
    zero_head["classifier.bias"] = torch.arange(10, dtype=torch.float32)
    reference = Checkpoint(ARGS, trained.class_map, zero_head)
    # The reference always says class 9; restricted to class 4 alone, both agree.
    assert check_parity(fp32, reference, calibration[:16]).top1_agreement < 0.5
    only_four = check_parity(fp32, reference, calibration[:16], classes=[4])
    assert only_four.top1_agreement == 1.0 and not only_four.passed


def test_bad_requests_are_refused(trained: Checkpoint) -> None:
    with pytest.raises(ExportError, match="format must be one of"):
        export_artifact(trained, "tflite", version_name="v", calibration=None)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(trained, version_name="v", opset=13)
    assert EXPORT_FORMATS == ("onnx", "onnx-int8", "ort")
    with pytest.raises(ExportError, match="target platform"):
        convert_to_ort(b"", target_platform="riscv")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_fallback_to_the_torchscript_exporter(
    trained: Checkpoint,
    calibration: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedobj.export as export

    def dynamo_fails(*_: object) -> onnx.ModelProto:
        raise RuntimeError("unsupported operator for this test")

    # A handler of our own, not caplog: the suite also runs with -p no:logging.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fedobj.export")
    monkeypatch.setattr(export, "_export_dynamo", dynamo_fails)
    logger.addHandler(handler)
    try:
        data = export_onnx(trained, version_name="v-ts", opset=17)
    finally:
        logger.removeHandler(handler)
    text = " ".join(r.getMessage() for r in records)
    assert "falling back to the TorchScript exporter" in text
    assert check_parity(data, trained, calibration[:7]).passed
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert meta["fedobj.version"] == "v-ts"


def test_calibration_images_from_the_test_split(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    grey = calibration_images(28, 1, n=100)
    assert grey is not None and grey.shape == (100, 1, 28, 28)
    assert grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, calibration_images(28, 1, n=100))  # seeded
    colour = calibration_images(32, 3, n=5)
    assert colour is not None and colour.shape == (5, 3, 32, 32)
    monkeypatch.setenv("FEDOBJ_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    assert calibration_images(28, 1) is None


def test_gaps_and_inactive_classes_survive_export() -> None:
    args = ModelArgs("cnn", num_classes=6, in_channels=3, image_size=20)
    class_map = ClassMap(
        (
            ClassEntry(0, "bag", "Bag"),
            ClassEntry(2, "coat", "Coat", active=False),
            ClassEntry(5, "mug", "Mug"),
        )
    )
    ckpt = Checkpoint(args, class_map, build_model(args).state_dict())
    result = export_artifact(ckpt, "onnx", version_name="gappy", calibration=None)
    predictor = Predictor.from_bytes(result.data)
    assert predictor.class_map == class_map and predictor.num_outputs == 6
    assert (predictor.preprocessing.channels, predictor.preprocessing.image_size) == (
        3,
        20,
    )


def test_mobilenet_v3_small_exports_with_parity() -> None:
    args = ModelArgs("mobilenet_v3_small", num_classes=10, in_channels=1, image_size=32)
    torch.manual_seed(0)
    ckpt = Checkpoint(args, fashion_mnist_class_map(), build_model(args).state_dict())
    result = export_artifact(ckpt, "onnx", version_name="mnv3", calibration=None)
    assert result.parity.passed, result.parity
