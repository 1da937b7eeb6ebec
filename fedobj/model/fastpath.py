"""An exact, faster way to run the ``cnn`` through a training or evaluation step.

Why: a node's local epoch is most of a round, and about 15% of the ``cnn``'s
step went to layers that eager PyTorch runs as written where cheaper exact forms
exist (a ReLU over the full map, an identity pool, dropout's Bernoulli draw). A
graph compiler would find these; ``torch.compile`` made the step slower here (40
against 20 ms per batch of 32). Measured on the project's 2-core machine, one
thread, batch 32, channels-last (``simulations/bench/vs_plain_flower.py`` shows
the effect on whole runs):

- **max-pool before ReLU**: ``relu(maxpool(x)) == maxpool(relu(x))``, values and
  gradients (the max of a window is positive exactly when its ReLU is), with the
  ReLU and its backward over a quarter of the values;
- **no identity pool**: the adaptive average pool to 7x7 averages one value per
  cell at 28x28 input; skipped when the input is already 7x7 (its backward alone
  took 4% of a step);
- **dropout from a uniform draw**: ``rand < 1 - p`` is the same Bernoulli mask
  as ``bernoulli_``, drawn 2.6x faster.

Anything but the exact ``SmallCNN`` layout (a subclass, another architecture, a
changed block, a forward hook on a module the fast path does not call: the model,
a ``Sequential``, ReLU, Dropout, Flatten) runs its own ``forward``:
:func:`fast_forward` returns the module itself. "Exact" means the same function
and gradients; the dropout mask is drawn from the same distribution but another
random stream, so a seeded run does not repeat a run made before this path.
The model's parameters, state-dict keys and ``forward`` are untouched,
so checkpoints, ONNX export and Opacus (which needs module calls) see the plain
model; the differential-privacy path does not use this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedobj.model.factory import SmallCNN

Forward = Callable[[torch.Tensor], torch.Tensor]

_BLOCK = (nn.Conv2d, (nn.GroupNorm, nn.BatchNorm2d), nn.ReLU, nn.MaxPool2d)
_HIDDEN = (nn.Flatten, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout)
_CALLED = (
    nn.Conv2d,
    nn.GroupNorm,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Linear,
)


def fast_forward(model: nn.Module) -> Forward:
    """``model``'s forward pass, as a faster equivalent where one is known.

    Returns a callable with the module's semantics (train/eval mode included):
    the fast path for an unmodified :class:`~fedobj.model.factory.SmallCNN`,
    otherwise ``model`` itself.
    """
    plan = _SmallCnnPlan.of(model)
    return plan.forward if plan is not None else model


@dataclass(frozen=True)
class _SmallCnnPlan:
    """The layers of an unmodified SmallCNN, typed, in the order they run."""

    model: nn.Module
    blocks: list[tuple[nn.Conv2d, nn.Module, nn.MaxPool2d]]
    pool: nn.AdaptiveAvgPool2d
    pool_size: tuple[int, int]
    drop: tuple[float, float]
    hidden: nn.Linear
    classifier: nn.Linear

    @classmethod
    def of(cls, model: nn.Module) -> _SmallCnnPlan | None:
        if type(model) is not SmallCNN:
            return None
        if any(_hooked(m) for m in model.modules() if not _called_here(m)):
            return None  # a hook on a module the fast path does not call
        blocks = [list(b.children()) for b in model.features.children()]
        hidden = list(model.hidden.children())
        if not blocks or not all(_layout(b, _BLOCK) for b in blocks):
            return None
        if not _layout(hidden, _HIDDEN) or not isinstance(model.classifier, nn.Linear):
            return None
        if not isinstance(model.pool, nn.AdaptiveAvgPool2d):
            return None
        out = model.pool.output_size
        size = (out, out) if isinstance(out, int) else out
        if not (isinstance(size, tuple) and len(size) == 2):
            return None
        if not all(isinstance(v, int) for v in size):
            return None
        return cls(
            model,
            [(b[0], b[1], b[3]) for b in blocks],  # type: ignore[misc]
            model.pool,
            (int(size[0] or 0), int(size[1] or 0)),
            (float(hidden[1].p), float(hidden[4].p)),  # type: ignore[arg-type]
            hidden[2],  # type: ignore[arg-type]
            model.classifier,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm, pool in self.blocks:
            x = torch.relu_(pool(norm(conv(x))))
        if tuple(x.shape[-2:]) != self.pool_size:
            x = self.pool(x)
        training = self.model.training
        x = dropout(x.flatten(1), self.drop[0], training)
        x = dropout(torch.relu_(self.hidden(x)), self.drop[1], training)
        logits: torch.Tensor = self.classifier(x)
        return logits


def _called_here(module: nn.Module) -> bool:
    """Layers the fast path still calls as modules (their hooks fire)."""
    return isinstance(module, _CALLED)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _layout(mods: list[nn.Module], kinds: tuple[type | tuple[type, ...], ...]) -> bool:
    return len(mods) == len(kinds) and all(
        type(m) in (k if isinstance(k, tuple) else (k,)) for m, k in zip(mods, kinds)
    )


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with the mask drawn as ``rand < 1 - p`` (same distribution)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return F.dropout(x, p, True)
    keep = 1.0 - p
    mask = (torch.rand_like(x) < keep).to(x.dtype).mul_(1.0 / keep)
    return x * mask
