"""The learning rate a round trains with: cosine across the run's rounds.

The server picks it per round and sends it to the nodes, so every node of a
round trains at the same rate. Cosine to ``lr-min`` is the schedule measured
(simulations/README.md, ``bench/accuracy.py``); constant and exponential
schedules were never shown to help and were retired.
"""

from __future__ import annotations

import math


def lr_for_round(
    base_lr: float, server_round: int, num_rounds: int, lr_min: float = 0.0
) -> float:
    """Cosine from ``base_lr`` at round 1 to ``lr_min`` at ``num_rounds``; past
    ``num_rounds`` it stays at ``lr_min``."""
    frac = min((server_round - 1) / max(num_rounds - 1, 1), 1.0)
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * frac))
