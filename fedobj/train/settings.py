"""What a local training stretch is asked to do and what it reports back.

Shared by the plain loop (:mod:`fedobj.train.loop`) and DP-SGD
(:mod:`fedobj.train.private`), so both read one configuration and return one
result shape to the ClientApp.
"""

from __future__ import annotations

from dataclasses import dataclass


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
