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
  as ``bernoulli_``, drawn 2.6x faster;
- **GroupNorm by channel-wise reductions** where a group has fewer than 8
  channels (the first block: 32 channels in 8 groups): PyTorch's channels-last
  GroupNorm kernel took 4.6 ms forward and backward on the first block's 32x32x28x28
  map, about a fifth of a step; reductions over H*W (vectorised over the
  channels) and broadcast multiply-adds take 2.1 ms for the same maths (values
  and gradients equal to float32 rounding, ~1e-6 relative). With 8 channels a
  group (the second block) PyTorch's kernel is the faster one and is kept.

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
            x = torch.relu_(pool(_norm(norm, conv(x))))
        if tuple(x.shape[-2:]) != self.pool_size:
            x = self.pool(x)
        training = self.model.training
        x = dropout(x.flatten(1), self.drop[0], training)
        x = dropout(torch.relu_(self.hidden(x)), self.drop[1], training)
        logits: torch.Tensor = self.classifier(x)
        return logits


SMALL_GROUP = 8
"""Channels per group below which :func:`group_norm` beats PyTorch's kernel."""


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if (
        type(norm) is nn.GroupNorm
        and norm.num_channels // norm.num_groups < SMALL_GROUP
        and norm.affine
        and not _hooked(norm)
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
        return group_norm(x, norm)
    out: torch.Tensor = norm(x)
    return out


def group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` for a channels-last float32 ``x``, by channel-wise reductions."""
    return _GroupNormChannelsLast.apply(  # type: ignore[no-any-return]
        x, norm.weight, norm.bias, norm.num_groups, norm.eps
    )


class _GroupNormChannelsLast(torch.autograd.Function):
    """GroupNorm on the (N, H*W, C) view of a channels-last map.

    Forward, two passes for the statistics (mean, then squares of the centred
    values, so no E[x^2] - E[x]^2 cancellation), every reduction over H*W with
    the channels innermost; the normalised ``xhat`` is kept for the backward:
    ``dx = rstd * (g*dy - (S1 + xhat*S2) / M)`` with ``S1``, ``S2`` the group sums
    of ``g*dy`` and ``g*dy*xhat`` and ``M`` the group's size.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        groups: int,
        eps: float,
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        per = c // groups
        xv = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: channels-last
        mean = xv.mean(1).view(n, groups, per).mean(-1, keepdim=True)
        xhat = xv - mean.expand(n, groups, per).reshape(n, 1, c)
        var = (xhat * xhat).sum(1).view(n, groups, per).sum(-1, keepdim=True)
        rstd = (var / (h * w * per) + eps).rsqrt().expand(n, groups, per)
        rstd = rstd.reshape(n, 1, c)
        xhat.mul_(rstd)
        y = torch.addcmul(bias, xhat, weight)
        ctx.save_for_backward(xhat, weight, rstd)
        ctx.groups = groups  # type: ignore[attr-defined]
        return y.view(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        xhat, weight, rstd = ctx.saved_tensors  # type: ignore[attr-defined]
        groups: int = ctx.groups  # type: ignore[attr-defined]
        n, hw, c = xhat.shape
        h, w = dy.shape[2], dy.shape[3]
        per = c // groups
        dyv = dy.permute(0, 2, 3, 1).reshape(n, hw, c)  # a copy if not channels-last
        sum_dy = dyv.sum(1)  # (n, c)
        sum_dy_xhat = (dyv * xhat).sum(1)

        def group_sum(t: torch.Tensor) -> torch.Tensor:
            s = (t * weight).view(n, groups, per).sum(-1, keepdim=True)
            out: torch.Tensor = s.expand(n, groups, per).reshape(n, 1, c)
            return out

        k = rstd / (hw * per)
        dx = torch.addcmul(-group_sum(sum_dy) * k, xhat, -group_sum(sum_dy_xhat) * k)
        dx.addcmul_(dyv, rstd * weight)
        dx_map = dx.view(n, h, w, c).permute(0, 3, 1, 2)
        return dx_map, sum_dy_xhat.sum(0), sum_dy.sum(0), None, None


def _called_here(module: nn.Module) -> bool:
    """Layers the fast path still calls as modules (their hooks fire)."""
    return isinstance(module, _CALLED)


def _hooked(module: nn.Module) -> bool:
    """A hook on ``module``, forward or backward, or one set for every module."""
    from torch.nn.modules import module as registry

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or registry._global_forward_hooks
        or registry._global_forward_pre_hooks
        or registry._global_backward_hooks
        or registry._global_backward_pre_hooks
    )


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
