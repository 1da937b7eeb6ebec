"""Models: the factory (architectures from ``ModelArgs``) and checkpoints."""

from fedobj.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedobj.model.factory import MODEL_NAMES, ModelArgs, build_model

__all__ = [
    "MODEL_NAMES",
    "Checkpoint",
    "ModelArgs",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
