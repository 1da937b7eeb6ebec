"""The local training loop, readable top to bottom: SGD with momentum, FedProx
and LwF distillation, over in-memory tensors.

One seed decides everything random in it (batch order, dropout), so one seed
gives one result whichever process or actor runs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fedobj.model.fastpath import fast_forward
from fedobj.train.losses import distillation_loss, logit_mask
from fedobj.train.settings import TrainConfig, TrainResult
from fedobj.train.sgd import FusedSGD
from fedobj.train.tensors import LabelledTensors, to_input


def train(
    model: nn.Module,
    data: LabelledTensors,
    cfg: TrainConfig,
    active: list[int] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """SGD with momentum for ``cfg.epochs`` over ``data``; FedProx term if ``mu > 0``.

    The proximal term mu/2 * ||w - w_global||^2 is added to the gradient directly
    (its gradient is mu * (w - w_global)), which avoids building it into the graph.
    With a ``teacher`` (the global model as received) and ``cfg.distill_classes``
    k > 0, the loss also pulls the old classes' outputs towards the teacher's, so a
    node holding only new-category images does not erase what the head knew.

    ``cfg.seed`` decides everything random in it: the batch order and dropout's
    masks (the global CPU RNG, seeded inside ``fork_rng`` so the
    caller's stream is left as it was): one seed, one result, whichever process
    or actor runs it.
    """
    if len(data) == 0:
        raise ValueError("no training samples after mapping through the class map")
    with channels_last(model, teacher), torch.random.fork_rng(devices=[]):
        # the CPU generator only (fork_rng restores no other); a stream of its
        # own, not the batch order's
        torch.default_generator.manual_seed(_dropout_seed(cfg.seed))
        return _train(model, data, cfg, active, teacher)


def _dropout_seed(seed: int) -> int:
    """The global RNG's seed in ``train``: derived from ``seed`` so dropout's
    draws are not the batch order's (both would start one stream)."""
    return (seed * 0x9E3779B97F4A7C15 + 0x5DEECE66D) % 2**63


@contextmanager
def channels_last(*models: nn.Module | None) -> Iterator[None]:
    """Run convolutions in NHWC (channels-last) memory layout, then switch back.

    oneDNN's convolution and its backward are about 20% faster on this CPU in
    NHWC for the ``cnn`` (18 -> 14 ms per batch of 32, one thread); the maths is
    the same. The models are returned to the default layout so their arrays
    serialise as plain C-ordered buffers.
    """
    for m in models:
        if m is not None:
            m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in models:
            if m is not None:
                m.to(memory_format=torch.contiguous_format)


def _train(
    model: nn.Module,
    data: LabelledTensors,
    cfg: TrainConfig,
    active: list[int] | None,
    teacher: nn.Module | None,
) -> TrainResult:
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(model.parameters())
    # fused: one kernel per parameter for momentum, decay and update (0.17 against
    # 0.45 ms a step for the cnn); the same update to float32 rounding. FusedSGD
    # is torch's SGD(fused=True) without torch.optim's import of torch._dynamo
    # (1.4-1.8 s in every ClientApp process on a SuperNode: fedobj/train/sgd.py)
    fused = all(p.dtype in (torch.float32, torch.float64) for p in params)
    opt: FusedSGD | torch.optim.SGD = (
        FusedSGD(params, cfg.lr, cfg.momentum, cfg.weight_decay)
        if fused
        else torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    )
    global_params = (
        [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else []
    )
    num_classes = num_outputs(model, data)
    mask = logit_mask(num_classes, active)
    old = [
        c
        for c in (active if active is not None else range(num_classes))
        if c < cfg.distill_classes
    ]
    distil = teacher is not None and len(old) > 1 and cfg.distill_weight > 0
    old_classes = torch.as_tensor(old, dtype=torch.long)
    if teacher is not None:
        teacher.eval()
    forward = fast_forward(model)
    teacher_forward = fast_forward(teacher) if teacher is not None else None
    n = len(data)
    t0 = time.perf_counter()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm cannot train on a batch of one
            x = to_input(data.images[idx]).contiguous(memory_format=torch.channels_last)
            y = data.labels[idx]
            raw = forward(x)
            logits = raw + mask if mask is not None else raw
            loss = F.cross_entropy(logits, y)
            if distil:
                assert teacher_forward is not None
                with torch.no_grad():
                    target = teacher_forward(x)
                loss = loss + cfg.distill_weight * distillation_loss(
                    raw, target, old_classes
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.proximal_mu > 0:
                with torch.no_grad():
                    for p, g in zip(model.parameters(), global_params):
                        if p.grad is not None:
                            p.grad.add_(p - g, alpha=cfg.proximal_mu)
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(idx)
            steps += 1
    seconds = time.perf_counter() - t0
    if seen == 0:
        return TrainResult(float("nan"), 0.0, 0, 0, seconds)
    return TrainResult(total_loss / seen, correct / seen, seen, steps, seconds)


def num_outputs(model: nn.Module, data: LabelledTensors) -> int:
    """The width of ``model``'s logits, from one forward pass on one image of
    ``data`` in eval mode (models keep their head in different places); the
    model's training mode is restored."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out = model(to_input(data.images[:1]))
        model.train(was_training)
    return int(out.shape[1])
