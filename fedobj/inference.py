"""Predictions from an exported model, with onnxruntime, numpy and Pillow only.

A model is an ONNX file or an ORT-format file (the mobile artifact); both carry
the same metadata and load the same way (:meth:`Predictor.from_bytes`).

Serving must not pay for torch (hundreds of MB, seconds to import), so this module
never imports it, directly or through another fedobj module: an exported file
carries its class map and preprocessing in its metadata (written by
:mod:`fedobj.export`), which is all a :class:`Predictor` needs. Uploaded bytes are
untrusted: :func:`decode_image` accepts a few common formats only, refuses
decompression bombs and truncated files with :class:`ImageInputError`, and turns any
colour mode into the 1 or 3 channels the model was trained on.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

from fedobj.classmap import ClassMap
from fedobj.errors import ClassMapError, FedObjError

# Keys of the ONNX model's ``metadata_props`` (written by fedobj.export).
META_CLASS_MAP = "fedobj.class_map"  # ClassMap.to_json()
META_VERSION = "fedobj.version"  # the registry version name
META_MODEL_ARGS = "fedobj.model_args"  # json of fedobj.model.ModelArgs
META_PREPROCESSING = "fedobj.preprocessing"  # Preprocessing.to_json()

MIN_IMAGE_SIDE = 8  # below this an upload is an icon or a mistake, not a photo
# Formats devices and browsers produce ("JPEG" also opens phones' MPO files).
# Everything else (EPS would start Ghostscript, for one) is refused unopened.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_MAX_BATCH = 64  # images per session run: bounds the input tensor's memory
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def is_ort_format(data: bytes) -> bool:
    """Whether ``data`` is an ORT-format model (a flatbuffer tagged ``ORTM``)."""
    return len(data) >= 8 and data[4:8] == b"ORTM"


class InferenceError(FedObjError):
    """A model cannot be served or a prediction request cannot be answered."""


class ImageInputError(InferenceError, ValueError):
    """Uploaded bytes are not a usable image; the message says why, for a person."""


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 pixels become the model's input; stored with every export.

    The defaults are what :func:`fedobj.train.to_input` does during training:
    ``(x / 255 - 0.5) / 0.5``. ``mean`` and ``std`` apply to every channel.
    """

    image_size: int
    channels: int
    mean: float = 0.5
    std: float = 0.5
    pixel_scale: float = 1.0 / 255.0
    resize: str = "bilinear"
    layout: str = "NCHW"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        try:
            raw = json.loads(text)
            pre = cls(
                image_size=int(raw["image_size"]),
                channels=int(raw["channels"]),
                mean=float(raw.get("mean", 0.5)),
                std=float(raw.get("std", 0.5)),
                pixel_scale=float(raw.get("pixel_scale", 1.0 / 255.0)),
                resize=str(raw.get("resize", "bilinear")),
                layout=str(raw.get("layout", "NCHW")),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise InferenceError(f"malformed preprocessing metadata: {exc}") from exc
        if pre.layout != "NCHW" or pre.resize != "bilinear" or pre.std == 0:
            raise InferenceError(f"unsupported preprocessing: {pre}")
        return pre

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, C, H, W)`` pixels -> the float32 tensor the model expects."""
        x = images.astype(np.float32) * np.float32(self.pixel_scale)
        return (x - np.float32(self.mean)) / np.float32(self.std)


@dataclass(frozen=True)
class Prediction:
    object_name: str
    confidence: float
    class_index: int


@dataclass(frozen=True)
class Detection:
    """One image's answer: the top classes among those allowed, best first.

    ``inference_time_ms`` is the model run time of the batch divided by its size,
    so decoding and queueing are not counted.
    """

    predictions: list[Prediction]
    detected: bool
    inference_time_ms: float
    model_version: str | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the API returns (plain Python floats, never NaN)."""
        return {
            "predictions": [
                {
                    "object_name": p.object_name,
                    "confidence": float(p.confidence),
                    "class_index": int(p.class_index),
                }
                for p in self.predictions
            ],
            "detected": bool(self.detected),
            "inference_time_ms": float(self.inference_time_ms),
            "model_version": self.model_version,
        }


def decode_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """Untrusted image bytes -> uint8 ``(channels, size, size)``.

    Raises
    ------
    ImageInputError
        Not an image in :data:`IMAGE_FORMATS`, truncated or corrupt, more pixels
        than ``PIL.Image.MAX_IMAGE_PIXELS``, or smaller than 8x8.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        # The filter only stops Pillow printing its bomb warning; the explicit size
        # check below is what refuses, because catch_warnings changes process-wide
        # state and is not thread-safe, so another thread may undo the filter.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                _check_size(img.width, img.height)
                img.load()  # decodes now, so a truncated file fails in this try
                return _to_array(ImageOps.exif_transpose(img), channels, size)
    except ImageInputError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageInputError(
            "not an image in a supported format "
            f"({', '.join(f.lower() for f in IMAGE_FORMATS)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"image refused as a decompression bomb: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageInputError(f"image is truncated or corrupt ({exc})") from exc


def _check_size(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageInputError(
            f"image refused as a decompression bomb: {width}x{height} pixels "
            f"exceeds the limit of {limit}"
        )
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ImageInputError(
            f"image is {width}x{height} pixels; at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed"
        )


def _to_array(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """Any Pillow mode -> "L" or "RGB", resized with antialiased bilinear."""
    img = _to_eight_bit(img)
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")  # palette and colour-key transparency as alpha
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Onto black: Fashion-MNIST objects sit on black, and training on image
        # folders converts without alpha, which shows transparent black as black.
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")  # CMYK, YCbCr, 1, ... too
    # Pillow widens BILINEAR's support when shrinking, i.e. it antialiases.
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :].copy() if channels == 1 else arr.transpose(2, 0, 1).copy()


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float grey -> 8-bit by scaling (Pillow's convert would clip)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # a [0, 1] float image
    else:
        return img
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # "L"


class Predictor:
    """An ONNX Runtime session plus the class map and preprocessing it came with.

    Thread-safe: ``InferenceSession.run`` may be called from many threads, and
    nothing else here changes after construction.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        class_map: ClassMap,
        preprocessing: Preprocessing,
        model_version: str | None = None,
    ) -> None:
        self.session = session
        self.class_map = class_map
        self.preprocessing = preprocessing
        self.model_version = model_version
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self._names = class_map.names_by_index()

    @classmethod
    def from_bytes(
        cls, data: bytes, version_name: str | None = None, *, threads: int = 1
    ) -> Predictor:
        """Load an export of :mod:`fedobj.export` (ONNX or ORT format);
        ``version_name`` overrides its own.

        One intra-op thread by default: a server answers requests in parallel, and
        threads per request beyond that only contend for the same cores. Every
        graph optimisation is on: ORT_ENABLE_EXTENDED (no NCHWc layout) measured
        1.3-2x slower here, and other session options (denormals as zero, no
        memory pattern, an offline-optimised file) no faster, within noise
        (``simulations/bench/inference.py``).
        """
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if is_ort_format(data):
            options.add_session_config_entry("session.load_model_format", "ORT")
        try:
            session = ort.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise InferenceError(
                f"not a loadable ONNX model (nor ORT format): {exc}"
            ) from exc
        meta = session.get_modelmeta().custom_metadata_map
        missing = [k for k in (META_CLASS_MAP, META_PREPROCESSING) if not meta.get(k)]
        if missing:
            raise InferenceError(
                f"ONNX model has no {', '.join(missing)} metadata; export it with "
                "`fedobj export` so it carries its class map and preprocessing"
            )
        try:
            class_map = ClassMap.from_json(meta[META_CLASS_MAP])
        except ClassMapError as exc:
            raise InferenceError(f"ONNX model metadata: {exc}") from exc
        preprocessing = Preprocessing.from_json(meta[META_PREPROCESSING])
        version = version_name if version_name is not None else meta.get(META_VERSION)
        return cls(session, class_map, preprocessing, version)

    @property
    def num_outputs(self) -> int:
        """Head rows (the logits' width); every class-map index is below it."""
        dim = self.session.get_outputs()[0].shape[-1]
        return int(dim) if isinstance(dim, int) else self.class_map.num_classes

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """Raw logits of uint8 ``(N, C, H, W)`` images and the run time in seconds."""
        pre = self.preprocessing
        expected = (pre.channels, pre.image_size, pre.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ImageInputError(
                f"images must be (N, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )
        if images.dtype != np.uint8:
            raise ImageInputError(f"images must be uint8, got {images.dtype}")
        outputs: list[np.ndarray] = []
        seconds = 0.0
        for start in range(0, len(images), _MAX_BATCH):
            x = pre.normalise(images[start : start + _MAX_BATCH])
            t0 = time.perf_counter()
            (out,) = self.session.run([self._output], {self._input: x})
            seconds += time.perf_counter() - t0
            outputs.append(np.asarray(out, dtype=np.float32))
        if not outputs:
            return np.zeros((0, self.num_outputs), dtype=np.float32), 0.0
        return np.concatenate(outputs), seconds

    def predict_arrays(
        self,
        images: np.ndarray,
        *,
        top_k: int = 5,
        threshold: float = 0.7,
        allowed: Collection[int] | None = None,
    ) -> list[Detection]:
        """One :class:`Detection` per uint8 ``(C, H, W)`` image in ``images``.

        Probabilities are a softmax over the ``allowed`` head rows only (default:
        the class map's active categories), so a deactivated category is never
        named and cannot take probability from the others. An empty ``allowed``
        gives empty predictions: nothing may be detected.
        """
        if top_k < 1:
            raise InferenceError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= threshold <= 1.0:
            raise InferenceError(f"threshold must be in [0, 1], got {threshold}")
        rows = self._allowed_rows(allowed)
        logits, seconds = self.logits(images)
        if not np.isfinite(logits).all():
            raise InferenceError("the model produced non-finite logits")
        per_image_ms = 1000.0 * seconds / max(len(images), 1)
        if rows.size == 0:
            return [
                Detection([], False, per_image_ms, self.model_version)
                for _ in range(len(images))
            ]
        chosen = logits[:, rows].astype(np.float64)
        chosen -= chosen.max(axis=1, keepdims=True)
        probs = np.exp(chosen)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, rows.size)
        detections = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            preds = [
                Prediction(self._names[int(rows[j])], float(p[j]), int(rows[j]))
                for j in order
            ]
            detections.append(
                Detection(
                    preds,
                    preds[0].confidence >= threshold,
                    per_image_ms,
                    self.model_version,
                )
            )
        return detections

    def predict_bytes(
        self,
        images: Sequence[bytes],
        *,
        top_k: int = 5,
        threshold: float = 0.7,
        allowed: Collection[int] | None = None,
    ) -> list[Detection]:
        """Decode each upload (see :func:`decode_image`) and predict them as a batch.

        Raises :class:`ImageInputError` naming the first unusable image.
        """
        pre = self.preprocessing
        arrays = []
        for i, data in enumerate(images):
            try:
                arrays.append(decode_image(data, pre.channels, pre.image_size))
            except ImageInputError as exc:
                if len(images) == 1:
                    raise
                raise ImageInputError(f"image {i}: {exc}") from exc
        shape = (0, pre.channels, pre.image_size, pre.image_size)
        batch = np.stack(arrays) if arrays else np.zeros(shape, dtype=np.uint8)
        return self.predict_arrays(
            batch, top_k=top_k, threshold=threshold, allowed=allowed
        )

    def _allowed_rows(self, allowed: Collection[int] | None) -> np.ndarray:
        if allowed is None:
            return np.array(self.class_map.active_indices, dtype=np.int64)
        rows = sorted({int(i) for i in allowed})
        unknown = [i for i in rows if i not in self._names or i >= self.num_outputs]
        if unknown:
            raise InferenceError(
                f"class indices {unknown} are not in this model's class map"
            )
        return np.array(rows, dtype=np.int64)


def measure_latency(
    predictor: Predictor, batch_size: int = 1, *, repeats: int = 30, warmup: int = 3
) -> float:
    """Median model run time in ms of ``batch_size`` seeded random images.

    Only the session run is timed (as ``inference_time_ms`` does), after
    ``warmup`` untimed runs; the median resists a busy neighbour's spikes.
    """
    if batch_size < 1 or repeats < 1:
        raise ValueError("batch_size and repeats must be >= 1")
    pre = predictor.preprocessing
    shape = (batch_size, pre.channels, pre.image_size, pre.image_size)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for _ in range(warmup):
        predictor.logits(images)
    runs = [predictor.logits(images)[1] for _ in range(repeats)]
    return 1000.0 * float(np.median(runs))


class PredictorCache:
    """Predictors by key, e.g. ``(version id, artifact sha256)``, at most ``max_size``.

    Callers pass the version they want on every request, so a new current version
    (or a rollback) is picked up by the very next one; the least recently used
    predictor is dropped. Building happens outside the cache's lock (a new version
    takes a second to load and must not stall requests for the cached ones), and
    once per key however many threads ask for it at the same time.
    """

    def __init__(self, max_size: int = 4, *, threads: int = 1) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.threads = threads
        self._items: OrderedDict[Hashable, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}

    def get(
        self,
        key: Hashable,
        load: Callable[[], bytes | Predictor],
        *,
        version_name: str | None = None,
    ) -> Predictor:
        """The cached predictor for ``key``, built from ``load()`` on first use.

        ``load`` returns the ONNX bytes (built with this cache's ``threads`` and
        ``version_name``) or a ready :class:`Predictor`.
        """
        cached = self.peek(key)
        if cached is not None:
            return cached
        with self._lock:
            key_lock = self._building.setdefault(key, threading.Lock())
        try:
            with key_lock:
                cached = self.peek(key)  # another thread built it while we waited
                if cached is not None:
                    return cached
                loaded = load()
                predictor = (
                    loaded
                    if isinstance(loaded, Predictor)
                    else Predictor.from_bytes(
                        loaded, version_name, threads=self.threads
                    )
                )
                with self._lock:
                    self._items[key] = predictor
                    while len(self._items) > self.max_size:
                        self._items.popitem(last=False)
                return predictor
        finally:
            with self._lock:
                self._building.pop(key, None)

    def peek(self, key: Hashable) -> Predictor | None:
        """The cached predictor for ``key`` (marked recently used), or None."""
        with self._lock:
            predictor = self._items.get(key)
            if predictor is not None:
                self._items.move_to_end(key)
            return predictor

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
