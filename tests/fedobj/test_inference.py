"""Torch-free inference: decoding untrusted uploads, masking, the predictor cache.

Predictors load real exports (made here with torch); the import check and one
prediction run in a fresh interpreter, where torch must never be imported.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedobj.classmap import ClassEntry, ClassMap
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.errors import FedObjError
from fedobj.inference import (
    Detection,
    ImageInputError,
    InferenceError,
    Predictor,
    PredictorCache,
    decode_image,
)

ROOT = Path(__file__).resolve().parents[2]
# Index 3 is inactive and index 4 is a gap: the head has 7 rows, 5 of them named.
CLASS_MAP = ClassMap(
    (
        ClassEntry(0, "t-shirt-top", "T-shirt/top"),
        ClassEntry(1, "trouser", "Trouser"),
        ClassEntry(2, "pullover", "Pullover"),
        ClassEntry(3, "dress", "Dress", active=False),
        ClassEntry(5, "sandal", "Sandal"),
        ClassEntry(6, "shirt", "Shirt"),
    )
)


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    import torch

    from fedobj.export import export_onnx
    from fedobj.model import Checkpoint, ModelArgs, build_model

    torch.manual_seed(0)
    args = ModelArgs("cnn", num_classes=7, in_channels=1, image_size=28)
    model = build_model(args)
    with torch.no_grad():  # spread the logits so the softmax is not flat
        model.classifier.weight.mul_(20.0)
    ckpt = Checkpoint(args, CLASS_MAP, model.state_dict())
    return export_onnx(ckpt, version_name="v7")


@pytest.fixture(scope="module")
def predictor(onnx_bytes: bytes) -> Predictor:
    return Predictor.from_bytes(onnx_bytes)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_fashion_mnist("test").images[:12]


def png(img: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


# ------------------------------------------------------------------ predictor


def test_predictor_reads_class_map_and_preprocessing(
    onnx_bytes: bytes, predictor: Predictor
) -> None:
    assert predictor.class_map == CLASS_MAP
    assert predictor.model_version == "v7"
    assert predictor.num_outputs == 7
    pre = predictor.preprocessing
    assert (pre.channels, pre.image_size, pre.mean, pre.std) == (1, 28, 0.5, 0.5)
    assert Predictor.from_bytes(onnx_bytes, "renamed").model_version == "renamed"


def test_default_allowed_is_the_active_classes(
    predictor: Predictor, images: np.ndarray
) -> None:
    detections = predictor.predict_arrays(images, top_k=10)
    assert len(detections) == len(images)
    for d in detections:
        indices = [p.class_index for p in d.predictions]
        assert sorted(indices) == CLASS_MAP.active_indices  # never 3, never 4
        assert sum(p.confidence for p in d.predictions) == pytest.approx(1.0)
        confidences = [p.confidence for p in d.predictions]
        assert confidences == sorted(confidences, reverse=True)
        names = CLASS_MAP.names_by_index()
        assert all(p.object_name == names[p.class_index] for p in d.predictions)
        assert d.model_version == "v7" and d.inference_time_ms > 0


def test_a_disallowed_class_never_appears(
    predictor: Predictor, images: np.ndarray
) -> None:
    full = predictor.predict_arrays(images, top_k=1)
    winner = full[0].predictions[0].class_index
    allowed = [i for i in CLASS_MAP.active_indices if i != winner]
    for d in predictor.predict_arrays(images, top_k=10, allowed=allowed):
        assert {p.class_index for p in d.predictions} == set(allowed)
        assert sum(p.confidence for p in d.predictions) == pytest.approx(1.0)
    # An explicitly allowed inactive class may be named (the caller decides).
    only = predictor.predict_arrays(images[:1], allowed={3}, threshold=0.99)[0]
    assert [p.class_index for p in only.predictions] == [3]
    assert only.predictions[0].confidence == pytest.approx(1.0) and only.detected


def test_top_k_threshold_and_empty_allowed(
    predictor: Predictor, images: np.ndarray
) -> None:
    (d,) = predictor.predict_arrays(images[:1], top_k=2, threshold=0.0)
    assert len(d.predictions) == 2 and d.detected
    (d,) = predictor.predict_arrays(images[:1], threshold=1.0)
    assert d.detected == (d.predictions[0].confidence >= 1.0)
    (d,) = predictor.predict_arrays(images[:1], allowed=[])
    assert d.predictions == [] and not d.detected
    with pytest.raises(InferenceError, match=r"\[4\]"):
        predictor.predict_arrays(images[:1], allowed=[0, 4])  # a gap in the map
    with pytest.raises(InferenceError, match="top_k"):
        predictor.predict_arrays(images[:1], top_k=0)


def test_to_dict_is_exactly_the_api_shape(
    predictor: Predictor, images: np.ndarray
) -> None:
    d = predictor.predict_arrays(images[:1], top_k=3)[0].to_dict()
    assert set(d) == {"predictions", "detected", "inference_time_ms", "model_version"}
    assert all(
        set(p) == {"object_name", "confidence", "class_index"} for p in d["predictions"]
    )
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert type(d["predictions"][0]["confidence"]) is float
    assert type(d["inference_time_ms"]) is float


def test_predict_bytes_matches_predict_arrays(
    predictor: Predictor, images: np.ndarray
) -> None:
    uploads = [png(Image.fromarray(img[0])) for img in images[:5]]
    from_bytes = predictor.predict_bytes(uploads)
    from_arrays = predictor.predict_arrays(images[:5])
    for a, b in zip(from_bytes, from_arrays):
        assert a.predictions == b.predictions
    with pytest.raises(ImageInputError, match="image 1: "):
        predictor.predict_bytes([uploads[0], b"not an image"])
    with pytest.raises(ImageInputError, match=r"\(N, 1, 28, 28\)"):
        predictor.predict_arrays(np.zeros((2, 3, 28, 28), np.uint8))


def test_broken_models_are_refused() -> None:
    with pytest.raises(InferenceError, match="not a loadable ONNX model"):
        Predictor.from_bytes(b"garbage")


# ------------------------------------------------------------------ decoding


def test_garbage_bytes_are_not_an_image() -> None:
    with pytest.raises(ImageInputError, match="not an image"):
        decode_image(b"\x00\x01garbage" * 10, 1, 28)
    with pytest.raises(ImageInputError, match="not an image"):
        decode_image(b"", 1, 28)


def test_unlisted_formats_are_refused() -> None:
    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, "PPM")
    with pytest.raises(ImageInputError, match="supported format"):
        decode_image(buf.getvalue(), 1, 28)


def test_truncated_png_is_refused() -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = png(Image.fromarray(noisy))
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], 1, 28)
    assert isinstance(ImageInputError("x"), FedObjError)


def test_tiny_images_are_refused() -> None:
    with pytest.raises(ImageInputError, match="4x4 pixels; at least 8x8"):
        decode_image(png(Image.new("L", (4, 4))), 1, 28)
    assert decode_image(png(Image.new("L", (8, 8))), 1, 28).shape == (1, 28, 28)


def test_decompression_bombs_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; we refuse there too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression bomb"):
        decode_image(png(Image.new("L", (40, 40))), 1, 28)  # 1600 px: warning zone
    with pytest.raises(ImageInputError, match="decompression bomb"):
        decode_image(png(Image.new("L", (100, 100))), 1, 28)  # 10000 px: error zone


def test_a_huge_png_header_is_refused_before_decoding() -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageInputError, match="decompression bomb"):
        decode_image(bomb, 1, 28)


def test_colour_becomes_grey_with_luma_weights() -> None:
    r, g, b = 200, 100, 50
    out = decode_image(png(Image.new("RGB", (30, 30), (r, g, b))), 1, 28)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert abs(int(out[0, 0, 0]) - round(0.299 * r + 0.587 * g + 0.114 * b)) <= 1
    rgb = decode_image(png(Image.new("L", (30, 30), 77)), 3, 32)
    assert rgb.shape == (3, 32, 32) and (rgb == 77).all()


def test_alpha_palette_cmyk_and_sixteen_bit() -> None:
    clear_white = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    assert (decode_image(png(clear_white), 1, 16) == 0).all()  # onto black
    opaque = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    assert (decode_image(png(opaque), 1, 16) == 255).all()
    palette = Image.new("RGB", (16, 16), (0, 0, 255)).convert("P")
    assert (decode_image(png(palette), 3, 16)[2] == 255).all()
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(cmyk, "JPEG")
    assert decode_image(cmyk.getvalue(), 3, 16).min() >= 250  # white
    deep = np.full((16, 16), 32896, dtype=np.uint16)  # 128 * 257
    sixteen = Image.fromarray(deep)
    assert sixteen.mode == "I;16"
    assert (decode_image(png(sixteen), 1, 16) == 128).all()  # scaled, not clipped


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": left goes to the top
    out = decode_image(png(Image.fromarray(pixels), exif=exif), 1, 16)[0]
    assert out[:4].min() == 255 and out[-4:].max() == 0


def test_downscaling_is_antialiased() -> None:
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes average to mid-grey when shrunk
    out = decode_image(png(Image.fromarray(stripes)), 1, 16)
    assert 100 <= out.mean() <= 155 and out.std() < 20


# ------------------------------------------------------------------ the cache


def test_cache_reuses_and_evicts_least_recently_used(onnx_bytes: bytes) -> None:
    loads: list[str] = []

    def loader(name: str) -> Callable[[], bytes]:
        def load() -> bytes:
            loads.append(name)
            return onnx_bytes

        return load

    cache = PredictorCache(max_size=2)
    a = cache.get(("v1", "sha-a"), loader("a"), version_name="v1")
    assert cache.get(("v1", "sha-a"), loader("a")) is a and loads == ["a"]
    assert a.model_version == "v1"
    cache.get(("v2", "sha-b"), loader("b"))
    assert cache.peek(("v1", "sha-a")) is a  # a is now the most recently used
    cache.get(("v3", "sha-c"), loader("c"))  # evicts b, not a
    assert len(cache) == 2 and ("v2", "sha-b") not in cache
    assert ("v1", "sha-a") in cache and cache.peek(("v2", "sha-b")) is None
    cache.get(("v2", "sha-b"), loader("b"))
    assert loads == ["a", "b", "c", "b"]
    ready = Predictor.from_bytes(onnx_bytes, "given")
    assert cache.get(("v9", "x"), lambda: ready) is ready


def test_cache_builds_once_under_concurrent_requests(onnx_bytes: bytes) -> None:
    cache = PredictorCache()
    calls: list[int] = []
    start = threading.Barrier(8)
    got: list[Predictor] = []

    def load() -> bytes:
        calls.append(1)
        return onnx_bytes

    def worker() -> None:
        start.wait()
        got.append(cache.get(("v1", "sha"), load))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 8 and all(p is got[0] for p in got)


# ------------------------------------------------------------------ no torch


def test_serving_never_imports_torch(onnx_bytes: bytes, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_bytes)
    upload = tmp_path / "upload.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(upload)
    script = f"""
import sys
from pathlib import Path
import fedobj.inference, fedobj.registry
from fedobj.inference import Predictor
p = Predictor.from_bytes(Path({str(model)!r}).read_bytes())
(d,) = p.predict_bytes([Path({str(upload)!r}).read_bytes()])
assert d.predictions and d.model_version == "v7", d
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_detection_is_frozen() -> None:
    d = Detection([], False, 1.0, None)
    with pytest.raises(AttributeError):
        d.detected = True  # type: ignore[misc]
