"""Classifier calibration with virtual features (CCVR: Luo et al., "No Fear of
Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data",
NeurIPS 2021), for a head that grew while no node held both old and new classes.

Under label skew each node's local training pulls the head towards the classes
it holds: after a growth in the *disjoint* setting (70% of nodes hold only the
old categories, 30% only the new ones) the averaged head is a tug of war that
nobody who sees both sides referees. The server can referee without seeing an
image: with each evaluation, each node sends, per class, the count, sum and sum
of outer products of the features the head reads (the penultimate layer of the
round's aggregate — the very model being calibrated — over the node's training
images). Summed over nodes these give every class's mean and covariance
exactly; the server draws virtual features from those Gaussians and retrains
only the head on them — every class at once, balanced — before the round's
version is registered. (Statistics sent with the train replies instead, from the
model before training, fit the head to the previous round's features: measured
worse and unsteady, simulations/README.md.)

Costs: one extra forward pass over a node's data (no gradients) and
``C·D·(D+1)+C`` floats per reply (10 classes, D=128: 0.66 MB against the
``cnn``'s 1.7 MB). What it reveals: per-class feature means and covariances
(more than a label histogram; with ``dp=true``, central DP or SecAgg+ it is
refused before round 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COUNT, SUM, OUTER = "count", "sum", "outer"


@contextmanager
def _head_inputs(model: nn.Module, head: nn.Module) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    try:
        yield seen
    finally:
        handle.remove()


def head_module(model: nn.Module, weight_key: str) -> nn.Linear:
    """The ``nn.Linear`` whose weight is ``weight_key`` (``head_keys``' first)."""
    module = model.get_submodule(weight_key.removesuffix(".weight"))
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{weight_key} is not a Linear layer's weight")
    return module


def feature_stats(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    weight_key: str,
    num_classes: int,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Per class: how many samples, the sum and the sum of outer products of
    the features the head reads (eval mode, no gradients). ``images`` is the
    model input already normalised; ``labels`` are class indices."""
    head = head_module(model, weight_key)
    dim = head.in_features
    count = np.zeros(num_classes, np.float64)
    total = np.zeros((num_classes, dim), np.float64)
    outer = np.zeros((num_classes, dim, dim), np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _head_inputs(model, head) as seen:
            for start in range(0, len(labels), batch_size):
                model(images[start : start + batch_size])
                feats = seen.pop().reshape(-1, dim).double()
                ys = labels[start : start + batch_size]
                for c in ys.unique().tolist():
                    f = feats[ys == c]
                    count[c] += len(f)
                    total[c] += f.sum(0).numpy()
                    outer[c] += (f.T @ f).numpy()
    finally:
        model.train(was_training)
    return {
        COUNT: count.astype(np.float32),
        SUM: total.astype(np.float32),
        OUTER: outer.astype(np.float32),
    }


class StatsSum:
    """Adds nodes' feature statistics (float64); checks each one's shapes."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.shapes = {
            COUNT: (num_classes,),
            SUM: (num_classes, dim),
            OUTER: (num_classes, dim, dim),
        }
        self.sums = {k: np.zeros(s, np.float64) for k, s in self.shapes.items()}
        self.nodes = 0

    def add(self, stats: dict[str, np.ndarray]) -> str | None:
        """Fold one node's statistics in; return why they were refused, or None."""
        for key, shape in self.shapes.items():
            value = stats.get(key)
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                return f"feature stats {key!r}: shape {got}, expected {shape}"
            if not np.all(np.isfinite(value)):
                return f"feature stats {key!r}: non-finite values"
        if np.any(stats[COUNT] < 0):
            return "feature stats: negative counts"
        for key in self.shapes:
            self.sums[key] += stats[key]
        self.nodes += 1
        return None


@dataclass(frozen=True)
class CalibrationSettings:
    """Virtual features per class, full-batch SGD steps and learning rate
    (momentum 0.9). A run uses the defaults, the values measured: a longer fit
    (500 features, 300 steps) was within the noise (simulations/README.md)."""

    samples: int = 200
    steps: int = 100
    lr: float = 0.1


@dataclass(frozen=True)
class Calibration:
    """What a calibration did (for the round's log line)."""

    classes: int
    samples: int
    loss_before: float
    loss_after: float


def calibrate_head(
    weight: np.ndarray,
    bias: np.ndarray,
    stats: StatsSum,
    active: list[int],
    *,
    samples_per_class: int = 200,
    steps: int = 100,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, Calibration] | None:
    """Retrain the head ``(weight, bias)`` on virtual features drawn from every
    active class's Gaussian; None when fewer than two classes have statistics.

    Rows of inactive classes are masked out of the loss and returned unchanged;
    so are the rows of classes no node reported (fewer than 2 samples).
    """
    count, total, outer = (stats.sums[k] for k in (COUNT, SUM, OUTER))
    known = [c for c in active if count[c] >= 2]
    if len(known) < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    dim = total.shape[1]
    feats, ys = [], []
    for c in known:
        mean = total[c] / count[c]
        cov = outer[c] / count[c] - np.outer(mean, mean)
        cov = (cov + cov.T) / 2 * count[c] / (count[c] - 1)  # unbiased
        # PSD and well-conditioned: eigenvalues floored (float64, then sampled)
        vals, vecs = np.linalg.eigh(cov)
        scale = vecs * np.sqrt(np.clip(vals, 1e-6, None))
        z = torch.randn(samples_per_class, dim, generator=gen, dtype=torch.float64)
        feats.append(torch.from_numpy(mean) + z @ torch.from_numpy(scale).T)
        ys.append(torch.full((samples_per_class,), c, dtype=torch.long))
    x = torch.cat(feats).float()
    y = torch.cat(ys)
    w = torch.tensor(weight, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    mask = torch.full((weight.shape[0],), float("-inf"))
    mask[known] = 0.0
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9)

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(x @ w.T + b + mask, y)

    with torch.no_grad():
        before = float(loss_fn())
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_fn())
    new_w, new_b = weight.copy(), bias.copy()
    new_w[known] = w.detach().numpy()[known]
    new_b[known] = b.detach().numpy()[known]
    return new_w, new_b, Calibration(len(known), len(y), before, after)
