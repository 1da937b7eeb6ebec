"""Predictions from an exported model, with onnxruntime, numpy and Pillow only.

A model is an ONNX file or an ORT-format file (the mobile artifact); both carry
the same metadata and load the same way (:meth:`Predictor.from_bytes`).

Serving must not pay for torch (hundreds of MB, seconds to import), so this package
never imports it, directly or through another fedobj module: an exported file
carries its class map and preprocessing in its metadata (written by
:mod:`fedobj.export`), which is all a :class:`Predictor` needs. Uploaded bytes are
untrusted: :func:`decode_image` accepts a few common formats only, refuses
decompression bombs and truncated files with :class:`ImageInputError`, and turns any
colour mode into the 1 or 3 channels the model was trained on.

One module per job: :mod:`~fedobj.inference.errors`,
:mod:`~fedobj.inference.metadata` (what an export carries),
:mod:`~fedobj.inference.images` (decoding uploads),
:mod:`~fedobj.inference.predictor` (the session and its answers) and
:mod:`~fedobj.inference.cache` (loaded predictors by version). This package
re-exports their public names, which is how the API, the CLI, the edge kit and the
tests import them.
"""

from fedobj.inference.cache import PredictorCache
from fedobj.inference.errors import ImageInputError, InferenceError
from fedobj.inference.images import IMAGE_FORMATS, MIN_IMAGE_SIDE, decode_image
from fedobj.inference.metadata import (
    META_CLASS_MAP,
    META_MODEL_ARGS,
    META_PREPROCESSING,
    META_VERSION,
    Preprocessing,
    is_ort_format,
)
from fedobj.inference.predictor import (
    Detection,
    Prediction,
    Predictor,
    measure_latency,
)

__all__ = [
    "IMAGE_FORMATS",
    "META_CLASS_MAP",
    "META_MODEL_ARGS",
    "META_PREPROCESSING",
    "META_VERSION",
    "MIN_IMAGE_SIDE",
    "Detection",
    "ImageInputError",
    "InferenceError",
    "Prediction",
    "Predictor",
    "PredictorCache",
    "Preprocessing",
    "decode_image",
    "is_ort_format",
    "measure_latency",
]
