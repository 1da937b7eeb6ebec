"""What the local loss makes of the logits: inactive rows masked, classes absent
from a node handled (FedRS, logit adjustment), and the LwF distillation term.

These shape the loss only; the accuracy a loop reports is always that of the
full, masked head, as evaluation sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedobj.train.settings import TrainConfig


def logit_mask(num_classes: int, active: list[int] | None) -> torch.Tensor | None:
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
