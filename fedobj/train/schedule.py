"""The learning rate a round trains with, from the run config's schedule.

The server picks it per round and sends it to the nodes, so every node of a
round trains at the same rate.
"""

from __future__ import annotations

import math


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
