"""Predictions from an exported model (ONNX or ORT format) with onnxruntime.

A :class:`Predictor` is a session plus the class map and preprocessing read from
the file's metadata; it answers in the API's /detect shape (:class:`Detection`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from fedobj.classmap import ClassMap
from fedobj.errors import ClassMapError
from fedobj.inference.errors import ImageInputError, InferenceError
from fedobj.inference.images import decode_image
from fedobj.inference.metadata import (
    META_CLASS_MAP,
    META_PREPROCESSING,
    META_VERSION,
    Preprocessing,
    is_ort_format,
)

_MAX_BATCH = 64  # images per session run: bounds the input tensor's memory


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
