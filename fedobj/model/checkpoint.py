"""Checkpoints that carry what made them: model arguments, class map, round, metrics.

Loading never guesses (STYLE.md rule 4): a checkpoint without its model arguments or
class map, or with a format version this code does not know, is refused.
Files are written atomically (temp file + rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedobj.classmap import ClassMap
from fedobj.errors import CheckpointError
from fedobj.model.factory import ModelArgs, build_model

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A model's weights with everything needed to rebuild and interpret it."""

    model_args: ModelArgs
    class_map: ClassMap
    state_dict: dict[str, torch.Tensor]
    round: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A model in eval mode with these weights loaded strictly."""
        model = build_model(self.model_args)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_args": ckpt.model_args.to_dict(),
        "class_map": ckpt.class_map.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "round": ckpt.round,
        "metrics": dict(ckpt.metrics),
        "extra": dict(ckpt.extra),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    payload = _read(path)
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this fedobj reads version {FORMAT_VERSION})"
        )
    for key in ("model_args", "class_map", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint has no {key!r}")
    return Checkpoint(
        model_args=ModelArgs.from_dict(payload["model_args"]),
        class_map=ClassMap.from_dict(payload["class_map"]),
        state_dict=payload["state_dict"],
        round=int(payload.get("round", 0)),
        metrics=dict(payload.get("metrics", {})),
        extra=dict(payload.get("extra", {})),
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a fedobj checkpoint or from a bare ``state_dict`` file."""
    payload = _read(path)
    if "state_dict" in payload and isinstance(payload["state_dict"], dict):
        return dict(payload["state_dict"])
    if all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload)
    raise CheckpointError(f"{path}: neither a fedobj checkpoint nor a state_dict")


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{p}: expected a dict, found {type(payload).__name__}")
    return payload
