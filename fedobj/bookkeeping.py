"""Per-sample clipping in one backward pass: DP-SGD's "book-keeping" trick.

Opacus' ghost clipping (Li et al. 2022) needs two backward passes per step: one
to get each sample's gradient norm, a second over the loss reweighted by the clip
factors. Book-keeping (Bu et al., "Differentially Private Optimization on Large
Model at Small Cost", ICML 2023) keeps what the first pass already had — every
trainable layer's input (activation) and the gradient at its output (backprop) —
and forms the clipped sum from those, so the second pass is never run:

- the norms: for ``nn.Linear`` on 2-D input, ``||a_i||·||g_i||`` (no per-sample
  gradient is formed: the 3136x128 hidden layer of the ``cnn`` would be 103 MB
  of them at batch 64); for every other layer, Opacus' own per-sample gradient
  function (``GRAD_SAMPLERS``: conv, GroupNorm, LayerNorm, ...), whose result is
  also what the clipped sum needs;
- the backward pass itself asks autograd only for the layer outputs' gradients
  (``torch.autograd.grad(loss, outputs)``), so autograd skips every weight
  gradient it would otherwise compute and throw away (and the first conv's whole
  backward): each weight gradient is formed once, already clipped;
- the clipped sum: ``Σ_i c_i g_i a_iᵀ = (c ⊙ g)ᵀ a`` for linear layers, and
  ``Σ_i c_i G_i`` for layers with per-sample gradients ``G_i``, with
  ``c_i = min(1, C / (‖G_i‖ + 1e-6))`` as Opacus computes it.

The result lands in ``p.grad`` exactly where Opacus' ghost clipping leaves it, so
Opacus' ``DPOptimizerFastGradientClipping`` adds the same noise, and the Poisson
data loader and accounting are Opacus' own. Samples must be independent in the
forward pass (no BatchNorm — which DP refuses anyway), every trainable layer
must be called once per forward, and nothing may change a layer's input or
output in place afterwards (the clipper turns ``inplace`` activations off and
checks the tensors' version counters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

# Opacus' registry of per-sample gradient functions, by module type
GRAD_SAMPLERS: dict[type, Callable[..., dict[nn.Parameter, torch.Tensor]]] = (
    GradSampleModule.GRAD_SAMPLERS
)


def disable_inplace(model: nn.Module) -> None:
    """Turn ``inplace`` activations off (same function): per-sample gradient
    hooks, Opacus' and ours, need each layer's input and output as they were."""
    for module in model.modules():
        if getattr(module, "inplace", False):
            setattr(module, "inplace", False)  # noqa: B010


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def unsupported_layers(model: nn.Module) -> list[str]:
    """The model's trainable layers book-keeping cannot clip (empty: all can)."""
    return [
        f"{name or '<model>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
        and type(m) not in GRAD_SAMPLERS
    ]


class BookKeepingClipper:
    """Hooks on ``model``'s trainable layers that turn one backward pass into
    clipped, summed per-sample gradients in each parameter's ``.grad``.

    Use per step: ``logits = model(x)`` (the hooks record), then
    :meth:`backward` with the per-sample losses; then the DP optimizer's step.
    :meth:`remove` takes the hooks off.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        bad = unsupported_layers(model)
        if bad:
            raise ValueError(
                "book-keeping DP has no per-sample gradient for: " + ", ".join(bad)
            )
        self.max_grad_norm = max_grad_norm
        self.layers = _trainable_layers(model)
        owned = [id(p) for m in self.layers for p in m.parameters(recurse=False)]
        if len(owned) != len(set(owned)):
            raise ValueError(
                "book-keeping DP cannot clip a parameter shared by two layers"
            )
        # an in-place activation would overwrite a recorded output (then autograd
        # answers for the activation's output, not the layer's) or input
        disable_inplace(model)
        self._records: dict[
            nn.Module, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]
        ] = {}
        self._handles = [
            layer.register_forward_hook(self._record) for layer in self.layers
        ]

    def _record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation: nothing to clip
        if module in self._records:
            raise RuntimeError(
                f"{type(module).__name__} ran twice in one forward pass: "
                "book-keeping needs each trainable layer called once"
            )
        a = inputs[0].detach()
        self._records[module] = (a, output, (a._version, output._version))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    def backward(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Set each parameter's ``.grad`` to the sum of clipped per-sample
        gradients of ``per_sample_loss`` (shape ``[batch]``); return the
        per-sample gradient norms before clipping."""
        records, self._records = self._records, {}
        missing = [m for m in self.layers if m not in records]
        if missing:
            raise RuntimeError(
                f"{len(missing)} trainable layer(s) did not run in the forward pass"
            )
        for layer in self.layers:
            a, out, versions = records[layer]
            if (a._version, out._version) != versions:
                raise RuntimeError(
                    f"the input or output of {type(layer).__name__} was changed "
                    "in place after it ran: book-keeping needs them as they were"
                )
        outputs = [records[m][1] for m in self.layers]
        backprops = torch.autograd.grad(per_sample_loss.sum(), outputs)
        n = per_sample_loss.shape[0]
        sq_norms = per_sample_loss.new_zeros(n)
        # per layer: ("linear", a, g) or ("samples", {param: per-sample grads})
        pending: list[tuple[nn.Module, Any]] = []
        for layer, g in zip(self.layers, backprops, strict=True):
            a = records[layer][0]
            if isinstance(layer, nn.Linear) and a.dim() == 2:
                g_sq = (g * g).sum(1)
                if layer.weight.requires_grad:
                    sq_norms += g_sq * (a * a).sum(1)
                if layer.bias is not None and layer.bias.requires_grad:
                    sq_norms += g_sq
                pending.append((layer, (a, g)))
            else:
                # Opacus' unfold2d reads NCHW strides: a channels-last input
                # gives wrong per-sample conv gradients (Opacus 1.6), so copy
                samples = GRAD_SAMPLERS[type(layer)](layer, [a.contiguous()], g)
                for gs in samples.values():
                    sq_norms += gs.reshape(n, -1).pow(2).sum(1)
                pending.append((layer, samples))
        norms = sq_norms.sqrt()
        scale = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for layer, item in pending:
            if isinstance(item, tuple):
                a, g = item
                scaled = g * scale[:, None]
                if layer.weight.requires_grad:
                    layer.weight.grad = scaled.t() @ a
                if layer.bias is not None and layer.bias.requires_grad:
                    layer.bias.grad = scaled.sum(0)
            else:
                for p, gs in item.items():
                    p.grad = (scale @ gs.reshape(n, -1)).view_as(p)
        return norms


def check_clippable(model: nn.Module, example: torch.Tensor) -> None:
    """Raise ``ValueError`` unless book-keeping can clip ``model``: every
    trainable layer has a per-sample gradient function, and a training step on
    ``example`` (a batch of 2 or more inputs) changes no layer's input or output
    in place (a residual ``out += x`` does: torchvision's MobileNetV3 blocks).
    The model's parameters and gradients are left as they were; its in-place
    activations are turned off (same function, as DP training needs anyway)."""
    clipper = BookKeepingClipper(model, 1.0)
    was_training = model.training
    saved = {p: p.grad for p in model.parameters()}
    try:
        model.train()
        out = model(example)
        try:
            clipper.backward(out.float().reshape(len(example), -1).sum(1))
        except RuntimeError as exc:
            raise ValueError(str(exc)) from exc
    finally:
        clipper.remove()
        model.train(was_training)
        for p, g in saved.items():
            p.grad = g
