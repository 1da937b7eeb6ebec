"""Evaluation of a model on labelled tensors: loss, accuracy, per-class accuracy
and the confusion counts, with inactive classes never predicted.

The same masking as training (:func:`fedobj.train.losses.logit_mask`), so a
deactivated category costs neither accuracy nor loss anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedobj.model.fastpath import fast_forward
from fedobj.train.loop import channels_last, num_outputs
from fedobj.train.losses import logit_mask
from fedobj.train.tensors import LabelledTensors, to_input


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    per_class_accuracy: dict[int, float] = field(default_factory=dict)
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)
    """``(true class, predicted class) -> images``, non-zero cells only."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: LabelledTensors,
    active: list[int] | None = None,
    batch_size: int = 512,
) -> EvalResult:
    """Loss, accuracy and per-class accuracy; inactive classes are never predicted."""
    model.eval()
    n = len(data)
    if n == 0:
        return EvalResult(float("nan"), 0.0, 0, {})
    num_classes = num_outputs(model, data)
    mask = logit_mask(num_classes, active)
    total_loss, preds = 0.0, []
    forward = fast_forward(model)
    with channels_last(model):
        for start in range(0, n, batch_size):
            x = to_input(data.images[start : start + batch_size])
            logits = forward(x.contiguous(memory_format=torch.channels_last))
            if mask is not None:
                logits = logits + mask
            y = data.labels[start : start + batch_size]
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1))
    pred = torch.cat(preds)
    hit = pred == data.labels
    per_class = {}
    for c in torch.unique(data.labels).tolist():
        sel = data.labels == c
        per_class[int(c)] = float(hit[sel].float().mean())
    pairs = data.labels.long() * num_classes + pred.long()
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    confusion = {
        (int(i) // num_classes, int(i) % num_classes): int(counts[i])
        for i in torch.nonzero(counts).flatten().tolist()
    }
    return EvalResult(
        total_loss / n, float(hit.float().mean()), n, per_class, confusion
    )
