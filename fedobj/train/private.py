"""DP-SGD on a device: per-sample clipping, Gaussian noise and Poisson-sampled
batches, with Opacus or book-keeping clipping (:mod:`fedobj.bookkeeping`).

Opacus and its DataLoader are imported only inside these functions: a node that
does not run DP never pays for them. What the device's privacy ledger records
(sample rate, steps) is planned here (:func:`dp_plan`) and checked against what
Opacus actually runs.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedobj.train.loop import num_outputs
from fedobj.train.losses import logit_mask
from fedobj.train.settings import TrainConfig, TrainResult
from fedobj.train.tensors import LabelledTensors, to_input

if TYPE_CHECKING:  # Opacus and DataLoader load only where DP runs
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from torch.utils.data import DataLoader

    from fedobj.bookkeeping import BookKeepingClipper


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
    mask = logit_mask(num_outputs(model, data), active)
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
