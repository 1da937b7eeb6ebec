"""Checkpoints that carry what made them: model arguments, class map, round, metrics.

Loading never guesses (STYLE.md rule 4): a checkpoint without its model arguments or
class map, or with a format version this code does not know, is refused.
Files are written atomically (temp file + rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import io
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


def checkpoint_to_bytes(ckpt: Checkpoint) -> bytes:
    """Serialise a checkpoint (torch's zip format, loadable with weights_only)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model_args": ckpt.model_args.to_dict(),
        "class_map": ckpt.class_map.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "round": ckpt.round,
        "metrics": dict(ckpt.metrics),
        "extra": dict(ckpt.extra),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def checkpoint_from_bytes(data: bytes, source: str = "<bytes>") -> Checkpoint:
    """Parse what :func:`checkpoint_to_bytes` wrote; ``source`` names it in errors."""
    payload = _parse(data, source)
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format version {version!r} is not supported "
            f"(this fedobj reads version {FORMAT_VERSION})"
        )
    for key in ("model_args", "class_map", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{source}: checkpoint has no {key!r}")
    return Checkpoint(
        model_args=ModelArgs.from_dict(payload["model_args"]),
        class_map=ClassMap.from_dict(payload["class_map"]),
        state_dict=payload["state_dict"],
        round=int(payload.get("round", 0)),
        metrics=dict(payload.get("metrics", {})),
        extra=dict(payload.get("extra", {})),
    )


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically: a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = checkpoint_to_bytes(ckpt)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    return checkpoint_from_bytes(_read_file(path), str(path))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a fedobj checkpoint or from a bare ``state_dict`` file."""
    payload = _parse(_read_file(path), str(path))
    if "state_dict" in payload and isinstance(payload["state_dict"], dict):
        return dict(payload["state_dict"])
    if all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload)
    raise CheckpointError(f"{path}: neither a fedobj checkpoint nor a state_dict")


def _read_file(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p.read_bytes()


def _parse(data: bytes, source: str) -> dict[str, Any]:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(
            f"{source}: not a readable torch checkpoint ({exc})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{source}: expected a dict, found {type(payload).__name__}"
        )
    return payload
