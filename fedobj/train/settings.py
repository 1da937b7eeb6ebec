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
    seed: int = 0
    distill_classes: int = 0  # > 0: distil the first k classes' outputs (LwF)
    distill_weight: float = 1.0


@dataclass(frozen=True)
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float
