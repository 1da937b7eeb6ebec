"""What an exported model file carries besides its graph: its class map, version,
model arguments and preprocessing (written by :mod:`fedobj.export`).

A :class:`~fedobj.inference.predictor.Predictor` needs nothing else, which is what
lets serving run without torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from fedobj.inference.errors import InferenceError

# Keys of the ONNX model's ``metadata_props`` (written by fedobj.export).
META_CLASS_MAP = "fedobj.class_map"  # ClassMap.to_json()
META_VERSION = "fedobj.version"  # the registry version name
META_MODEL_ARGS = "fedobj.model_args"  # json of fedobj.model.ModelArgs
META_PREPROCESSING = "fedobj.preprocessing"  # Preprocessing.to_json()


def is_ort_format(data: bytes) -> bool:
    """Whether ``data`` is an ORT-format model (a flatbuffer tagged ``ORTM``)."""
    return len(data) >= 8 and data[4:8] == b"ORTM"


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
