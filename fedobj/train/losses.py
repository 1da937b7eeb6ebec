"""What the local loss makes of the logits: inactive rows masked, and the LwF
distillation term after a growth.

These shape the loss only; the accuracy a loop reports is always that of the
full, masked head, as evaluation sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_TEMPERATURE = 2.0
"""LwF's softening temperature (Li & Hoiem's value; never measured elsewhere)."""


def logit_mask(num_classes: int, active: list[int] | None) -> torch.Tensor | None:
    """Additive mask: 0 for active rows, -inf for inactive ones (rows are kept)."""
    if active is None or len(active) == num_classes:
        return None
    mask = torch.full((num_classes,), float("-inf"))
    mask[torch.as_tensor(active, dtype=torch.long)] = 0.0
    return mask


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    classes: torch.Tensor,
    temperature: float = DISTILL_TEMPERATURE,
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
