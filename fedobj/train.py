"""Local training and evaluation loops, readable top to bottom.

Data arrives as uint8 tensors already in memory (a node's partition is small), so the
loops index tensors directly instead of going through a DataLoader: no worker
processes, no per-sample Python, which matters when hundreds of virtual clients share
two cores.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedobj.classmap import ClassMap
from fedobj.data.fashion_mnist import ImageArrays
from fedobj.model.fastpath import fast_forward

if TYPE_CHECKING:  # Opacus and DataLoader load only where DP runs
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from torch.utils.data import DataLoader

    from fedobj.bookkeeping import BookKeepingClipper

# Normalisation to roughly [-1, 1]; stored nowhere because every fedobj model uses it.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


@dataclass(frozen=True)
class LabelledTensors:
    """Images (uint8, N x C x H x W) and class-map indices (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MappedData:
    """A node's data mapped through the class map, with what could not be mapped."""

    tensors: LabelledTensors
    ignored: Counter[str]
    histogram: Counter[str]


def map_to_class_map(data: ImageArrays, class_map: ClassMap) -> MappedData:
    """Translate local label slugs to the class map's indices (DESIGN.md contract 2).

    Samples whose slug is not in the map are dropped and counted by slug; so are
    samples of inactive categories, which must not be trained on.
    """
    lookup = {e.slug: e.index for e in class_map.entries if e.active}
    table = np.array([lookup.get(s, -1) for s in data.label_slugs], dtype=np.int64)
    mapped = table[data.labels] if len(data) else np.zeros(0, dtype=np.int64)
    keep = mapped >= 0
    counts = np.bincount(data.labels, minlength=len(data.label_slugs))
    ignored = Counter(
        {
            s: int(counts[i])
            for i, s in enumerate(data.label_slugs)
            if table[i] < 0 and counts[i] > 0
        }
    )
    histogram = Counter(
        {
            s: int(counts[i])
            for i, s in enumerate(data.label_slugs)
            if table[i] >= 0 and counts[i] > 0
        }
    )
    return MappedData(
        LabelledTensors(
            torch.from_numpy(np.ascontiguousarray(data.images[keep])),
            torch.from_numpy(mapped[keep]),
        ),
        ignored,
        histogram,
    )


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> normalised float32 model input."""
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.0
    augment: bool = False
    seed: int = 0
    distill_classes: int = 0  # > 0: distil the first k classes' outputs (LwF)
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    # "all": every image (LwF); "old": only images of the old classes, so a
    # node's images of a new class are not held to what the old model made
    # of them (it saw a shirt as a T-shirt, a pullover or a coat)
    distill_samples: str = "all"
    local_loss: str = "ce"  # one of LOCAL_LOSSES: how classes absent locally count
    restricted_alpha: float = 0.5  # "restricted": scale of absent classes' logits
    logit_adjust_tau: float = 1.0  # "logit-adjusted": weight of log local prior
    # parameter names left as received: the head (calibration-freeze-head) or
    # all but the head (a warm-up round after a growth); they take no gradient,
    # and a batch-norm layer whose parameters are all frozen runs in eval mode
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    per_class_accuracy: dict[int, float] = field(default_factory=dict)
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)
    """``(true class, predicted class) -> images``, non-zero cells only."""


def _logit_mask(num_classes: int, active: list[int] | None) -> torch.Tensor | None:
    """Additive mask: 0 for active rows, -inf for inactive ones (rows are kept)."""
    if active is None or len(active) == num_classes:
        return None
    mask = torch.full((num_classes,), float("-inf"))
    mask[torch.as_tensor(active, dtype=torch.long)] = 0.0
    return mask


LOCAL_LOSSES = ("ce", "restricted", "restricted-new", "logit-adjusted")


def restricted_logits(
    logits: torch.Tensor, present: torch.Tensor, alpha: float
) -> torch.Tensor:
    """FedRS (Li & Zhan, KDD 2021): scale the logits of locally absent classes by alpha.

    Under label skew a node's cross-entropy pushes every class it never sees
    down on all its images; averaged over nodes, that drags the rows of classes
    held by few nodes (new categories after a growth, or old ones on new-only
    nodes) towards "never predicted". Scaling those logits by ``alpha`` shrinks
    their share of the softmax, and with it that push: ``alpha = 1`` is plain
    cross-entropy, ``alpha = 0`` leaves absent rows no gradient at all (their
    logit is the constant 0). ``present`` is a bool vector over the head's rows.
    """
    scale = torch.where(
        present.to(logits.device),
        torch.ones((), dtype=logits.dtype, device=logits.device),
        torch.full((), alpha, dtype=logits.dtype, device=logits.device),
    )
    return logits * scale


def adjusted_logits(
    logits: torch.Tensor, counts: torch.Tensor, tau: float
) -> torch.Tensor:
    """Logit adjustment by the local label prior (Menon et al. 2021; FedLC, ICML 2022).

    Training on ``logits + tau * log(prior)`` makes the node's frequent classes
    pay for their frequency, so the learnt logits approximate the balanced
    (prior-free) ones that the averaged model should hold. Classes with no local
    sample have prior 0: their logit becomes -inf, i.e. they are masked out of the
    local softmax (no gradient, no push). ``counts`` are per-row sample counts.
    """
    counts = counts.to(device=logits.device, dtype=logits.dtype)
    prior = counts / counts.sum().clamp_min(1.0)
    offset = torch.where(
        counts > 0,
        tau * torch.log(prior.clamp_min(torch.finfo(logits.dtype).tiny)),
        torch.full_like(prior, float("-inf")),
    )
    return logits + offset


def local_loss_logits(
    logits: torch.Tensor, counts: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """The logits the local cross-entropy sees under ``cfg.local_loss``.

    ``counts`` is the node's per-class sample count over the head's rows (what
    it knows of its own labels; nothing leaves the node). Inactive rows must be
    masked *after* this (``-inf`` scaled by 0 would be NaN).
    """
    if cfg.local_loss == "ce":
        return logits
    if cfg.local_loss == "restricted":
        return restricted_logits(logits, counts > 0, cfg.restricted_alpha)
    if cfg.local_loss == "restricted-new":
        # only the rows a recent growth added (index >= distill-classes, while
        # the server asks for distillation) are restricted where absent: a node
        # holding only old categories stops pushing them down, while a node
        # holding new ones still pushes the old rows down on its images, which
        # is what teaches "this is not an old category"; outside a growth
        # window (distill-classes 0) it is plain cross-entropy
        rows = torch.arange(counts.shape[0], device=counts.device)
        keep = (counts > 0) | (rows < cfg.distill_classes) | (cfg.distill_classes == 0)
        return restricted_logits(logits, keep, cfg.restricted_alpha)
    if cfg.local_loss == "logit-adjusted":
        return adjusted_logits(logits, counts, cfg.logit_adjust_tau)
    raise ValueError(
        f"local-loss must be one of {LOCAL_LOSSES}, got {cfg.local_loss!r}"
    )


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    classes: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """LwF term: KL(teacher || student) over the old ``classes``, softened by T.

    Scaled by T^2 so its gradient keeps the same size whatever the temperature
    (Hinton et al., 2015). Only old classes are compared (the new rows have no
    teacher to agree with), on raw logits: a masked (inactive) row would be -inf.
    """
    t = temperature
    log_p = F.log_softmax(student[:, classes] / t, dim=1)
    q = F.softmax(teacher[:, classes] / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


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
    node holding only new-category images does not erase what the head knew
    (``distill_samples="old"`` distils on old-class images only: such a node
    then trains as without distillation).

    ``cfg.seed`` decides everything random in it: the batch order, the flips,
    and dropout's masks (the global CPU RNG, seeded inside ``fork_rng`` so the
    caller's stream is left as it was): one seed, one result, whichever process
    or actor runs it.
    """
    if len(data) == 0:
        raise ValueError("no training samples after mapping through the class map")
    # frozen parameters need no gradient: a head-only round backpropagates
    # through the head alone
    frozen = [
        p for n, p in model.named_parameters() if n in cfg.frozen and p.requires_grad
    ]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with channels_last(model, teacher), torch.random.fork_rng(devices=[]):
            # the CPU generator only (fork_rng restores no other); a stream of
            # its own, not the batch order's
            torch.default_generator.manual_seed(_dropout_seed(cfg.seed))
            return _train(model, data, cfg, active, teacher)
    finally:
        for p in frozen:
            p.requires_grad_(True)


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
    names = {n for n, _ in model.named_parameters()}
    if unknown := set(cfg.frozen) - names:
        raise ValueError(f"cannot freeze {sorted(unknown)}: no such parameter")
    params = [p for n, p in model.named_parameters() if n not in cfg.frozen]
    # fused: one kernel per parameter for momentum, decay and update (0.17 against
    # 0.45 ms a step for the cnn); the same update to float32 rounding
    fused = all(p.dtype in (torch.float32, torch.float64) for p in params)
    opt = torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )
    global_params = (
        [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else []
    )
    num_classes = _num_outputs(model, data)
    mask = _logit_mask(num_classes, active)
    old = [
        c
        for c in (active if active is not None else range(num_classes))
        if c < cfg.distill_classes
    ]
    distil = teacher is not None and len(old) > 1 and cfg.distill_weight > 0
    old_classes = torch.as_tensor(old, dtype=torch.long)
    counts = torch.bincount(data.labels, minlength=num_classes)[:num_classes]
    if teacher is not None:
        teacher.eval()
    for module in _frozen_norms(model, set(cfg.frozen)):
        module.eval()  # its running statistics stay as received too
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
            if cfg.augment:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
            y = data.labels[idx]
            raw = forward(x)
            shaped = local_loss_logits(raw, counts, cfg)
            logits = shaped + mask if mask is not None else shaped
            loss = F.cross_entropy(logits, y)
            if distil:
                assert teacher_forward is not None
                keep = y < cfg.distill_classes if cfg.distill_samples == "old" else None
                if keep is None or bool(keep.any()):
                    with torch.no_grad():
                        target = teacher_forward(x)
                    student = raw
                    if keep is not None:
                        student, target = raw[keep], target[keep]
                    # a batch mean over the kept images, scaled by their share:
                    # each kept image pulls as hard as under "all"
                    share = 1.0 if keep is None else float(keep.sum()) / len(y)
                    loss = loss + cfg.distill_weight * share * distillation_loss(
                        student, target, old_classes, cfg.distill_temperature
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
            # accuracy of the full head, as evaluated, not of the shaped logits
            full = raw.detach() + mask if mask is not None else raw.detach()
            correct += int((full.argmax(1) == y).sum())
            seen += len(idx)
            steps += 1
    seconds = time.perf_counter() - t0
    if seen == 0:
        return TrainResult(float("nan"), 0.0, 0, 0, seconds)
    return TrainResult(total_loss / seen, correct / seen, seen, steps, seconds)


def _frozen_norms(model: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """The batch-norm layers whose every parameter is frozen: training mode
    would still move their running statistics, so they run in eval mode."""
    out: list[nn.Module] = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [
                f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()
            ]
            if own and set(own) <= frozen:
                out.append(module)
    return out


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
    num_classes = _num_outputs(model, data)
    mask = _logit_mask(num_classes, active)
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


def lr_for_round(
    base_lr: float,
    schedule: str,
    server_round: int,
    num_rounds: int,
    decay: float = 0.95,
    lr_min: float = 0.0,
) -> float:
    """Learning rate for a round: constant, exponential, or cosine to ``lr_min``."""
    if schedule == "constant":
        return base_lr
    if schedule == "exponential":
        return base_lr * decay ** (server_round - 1)
    if schedule == "cosine":  # past ``num_rounds`` it stays at ``lr_min``
        frac = min((server_round - 1) / max(num_rounds - 1, 1), 1.0)
        return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def _num_outputs(model: nn.Module, data: LabelledTensors) -> int:
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out = model(to_input(data.images[:1]))
        model.train(was_training)
    return int(out.shape[1])


@dataclass(frozen=True)
class DpSettings:
    """DP-SGD parameters (run config ``dp-*``).

    ``grad_sample_mode`` is how the per-sample gradient norms are obtained; every
    mode clips each sample's gradient to ``max_grad_norm`` and adds the same
    noise (Opacus' optimizer and Poisson loader), they differ in speed only.
    "bk" (book-keeping, :mod:`fedobj.bookkeeping`: one backward pass, the
    clipped sum formed from the activations and backprops it kept) takes 1.4x a
    plain step of the ``cnn`` at one thread and 1.7x at two; Opacus' "ghost"
    (a second backward on the clip-weighted loss) 2.3x and 2.5x; "hooks"
    4.7-5.6x and 6-8x (simulations/bench/privacy.py, simulations/README.md).
    "auto" is "bk" where it can clip the model, else "ghost" (a residual
    ``out += x``, as in torchvision's MobileNetV3, rules "bk" out).
    """

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "auto"  # one of DP_GRAD_SAMPLE_MODES


# "auto", "bk" (book-keeping clipping, fedobj.bookkeeping), and Opacus 1.6's
# per-sample-gradient modes that run on CPU ("ew": expanded weights)
DP_GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks", "functorch", "ew")


def batch_mixing_layers(model: nn.Module) -> list[str]:
    """BatchNorm layers, trainable or not: in training they normalise each
    sample by its batch-mates' statistics, so no per-sample bound (and no DP
    guarantee) exists. Opacus' validator checks only trainable layers."""
    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def resolve_grad_sample_mode(mode: str, model: nn.Module, example: torch.Tensor) -> str:
    """``mode``, or for "auto" the fastest that clips ``model`` exactly: "bk"
    unless a step on ``example`` (model input) shows it cannot, then "ghost"."""
    if mode != "auto":
        return mode
    from fedobj.bookkeeping import check_clippable

    try:
        check_clippable(model, example)
    except ValueError:
        return "ghost"
    return "bk"


@dataclass(frozen=True)
class PrivateTrainResult:
    """A DP-SGD stretch: the usual result plus what the accountant needs."""

    result: TrainResult
    sample_rate: float
    steps: int


def dp_plan(n: int, cfg: TrainConfig) -> tuple[float, int]:
    """(sample rate, steps) DP-SGD will use on ``n`` examples, exactly as Opacus
    derives them (``DPDataLoader.from_data_loader``): the rate is one over the
    plain loader's batch count ``ceil(n / batch)`` and each epoch draws
    ``int(1 / rate)`` Poisson batches. The device's ledger records these, so it
    accounts for what was run, not an approximation of it."""
    batches = max(1, math.ceil(n / cfg.batch_size))
    sample_rate = 1 / batches
    steps = cfg.epochs * int(1 / sample_rate)
    return sample_rate, steps


def bookkeeping_private(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader[Any],
    dp: DpSettings,
    noise_rng: torch.Generator | None = None,
) -> tuple[
    nn.Module, DPOptimizerFastGradientClipping, DPDataLoader, BookKeepingClipper
]:
    """What ``PrivacyEngine.make_private`` sets up for ghost clipping — Poisson
    loader, ``DPOptimizerFastGradientClipping`` (noise on the clipped sum, mean
    over the expected batch) — with book-keeping clipping instead of Opacus'
    two-pass hooks. The model itself is not wrapped."""
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.validators import ModuleValidator

    from fedobj.bookkeeping import BookKeepingClipper

    ModuleValidator.validate(model, strict=True)  # what make_private checks
    poisson = DPDataLoader.from_data_loader(loader)  # the loader's generator
    expected_batch = int(len(poisson.dataset) * poisson.sample_rate)  # type: ignore[arg-type]
    dp_opt = DPOptimizerFastGradientClipping(
        opt,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=noise_rng,
    )
    return model, dp_opt, poisson, BookKeepingClipper(model, dp.max_grad_norm)


def train_private(
    model: nn.Module,
    data: LabelledTensors,
    cfg: TrainConfig,
    dp: DpSettings,
    active: list[int] | None = None,
) -> PrivateTrainResult:
    """DP-SGD with Opacus: per-sample clipping to ``max_grad_norm``, Gaussian
    noise, Poisson-sampled batches (what the RDP accountant assumes).

    A fresh ``PrivacyEngine`` per call is fine because the accounting lives in
    the device's ledger (:mod:`fedobj.privacy`), not in the engine. The model's
    parameters are trained in place (Opacus wraps the same module).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedobj.bookkeeping import disable_inplace

    if len(data) == 0:
        raise ValueError("no training samples after mapping through the class map")
    sample_rate, steps = dp_plan(len(data), cfg)
    if dp.grad_sample_mode not in DP_GRAD_SAMPLE_MODES:
        raise ValueError(
            f"dp-grad-sample-mode must be one of {DP_GRAD_SAMPLE_MODES}, "
            f"got {dp.grad_sample_mode!r}"
        )
    if mixing := batch_mixing_layers(model):
        raise ValueError(
            f"DP-SGD needs per-sample gradients; BatchNorm mixes samples: {mixing}"
        )
    # probed on zeros: nothing of the private data runs outside DP-SGD
    probe = torch.zeros((min(2, len(data)), *data.images.shape[1:]))
    mode = resolve_grad_sample_mode(dp.grad_sample_mode, model, probe)
    disable_inplace(model)  # Opacus' hooks cannot follow in-place ops
    model.train()
    # The noise and the Poisson draws must be secret: seeded from the run
    # config (which the server knows) they could be replayed and the noise
    # subtracted. Both generators, and the global RNG (dropout, and whatever
    # Opacus draws without a generator), are seeded from the OS's CSPRNG.
    # (Opacus' secure_mode would need torchcsprng, not installed here.)
    noise_rng = torch.Generator().manual_seed(secrets.randbits(63))
    sample_rng = torch.Generator().manual_seed(secrets.randbits(63))
    torch.manual_seed(secrets.randbits(63))
    loader = DataLoader(
        TensorDataset(data.images, data.labels),
        batch_size=cfg.batch_size,
        generator=sample_rng,
    )
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    clipper: BookKeepingClipper | None = None
    if mode == "bk":
        private, dp_opt, dp_loader, clipper = bookkeeping_private(
            model, opt, loader, dp, noise_rng
        )
        criterion: Callable[..., torch.Tensor] = F.cross_entropy
    else:
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        made = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            criterion=nn.CrossEntropyLoss(),
            noise_generator=noise_rng,  # the loader keeps sample_rng
        )
        # ghost clipping also returns a wrapped loss whose backward() runs its two
        # passes; the other modes clip in the optimizer after a plain backward
        private, dp_opt, dp_loader = made[0], made[1], made[-1]
        criterion = made[2] if len(made) == 4 else F.cross_entropy
    ran = (float(dp_loader.sample_rate), cfg.epochs * len(dp_loader))
    if ran != (sample_rate, steps):  # the ledger must record what is run
        raise RuntimeError(
            f"Opacus samples at rate {ran[0]} for {ran[1]} steps, the plan said "
            f"{sample_rate} for {steps}"
        )
    mask = _logit_mask(_num_outputs(model, data), active)
    t0 = time.perf_counter()
    total_loss, correct, seen, done = 0.0, 0, 0, 0
    # Opacus' hooks warn on every first backward that the input needs no grad
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        for _ in range(cfg.epochs):
            for images, labels in dp_loader:
                if len(labels) == 0:
                    continue  # Poisson sampling can draw an empty batch
                # cleared before the forward: "ew" refuses to run over stale grads
                dp_opt.zero_grad(set_to_none=True)
                logits = private(to_input(images))
                if mask is not None:
                    logits = logits + mask
                if clipper is not None:
                    per_sample = F.cross_entropy(logits, labels, reduction="none")
                    clipper.backward(per_sample)
                    loss = per_sample.detach().mean()
                else:
                    loss = criterion(logits, labels)
                    loss.backward()
                dp_opt.step()
                total_loss += loss.item() * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
                done += 1
    finally:
        if clipper is not None:
            clipper.remove()
    seconds = time.perf_counter() - t0
    result = TrainResult(
        total_loss / seen if seen else float("nan"),
        correct / seen if seen else 0.0,
        seen,
        done,
        seconds,
    )
    # every Poisson draw counts, empty ones included: the ledger records the
    # planned steps, never fewer than the accountant saw
    return PrivateTrainResult(result, sample_rate, steps)
