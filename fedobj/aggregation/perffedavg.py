"""PerfFedAvg's aggregation weights: data size and reported accuracy, mixed.

Only the weights live here; the average they weigh is the streaming one
(:class:`fedobj.aggregation.streaming.StreamingMean`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def perf_fedavg_weights(
    num_examples: Sequence[float],
    accuracies: Sequence[float | None],
    alpha: float,
) -> np.ndarray:
    """PerfFedAvg: eta_k = alpha * n_k / sum(n) + (1 - alpha) * acc_k / sum(acc).

    With ``alpha = 1`` this is FedAvg. When no node reports an accuracy (or all
    report 0) the weights fall back to FedAvg's; a node that reports none while
    others do is given the mean of the reported accuracies, so a missing metric
    neither rewards nor punishes it.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"perf-alpha must be in [0, 1], got {alpha}")
    n = np.asarray(num_examples, dtype=np.float64)
    if len(n) == 0:
        return n
    if (n <= 0).any():
        raise ValueError("every num-examples must be > 0")
    data_w = n / n.sum()
    reported = [a for a in accuracies if a is not None]
    if not reported or sum(reported) < 1e-30:  # subnormal sums divide badly
        return np.asarray(data_w)
    mean_acc = float(np.mean(reported))
    acc = np.asarray([mean_acc if a is None else a for a in accuracies], np.float64)
    return np.asarray(alpha * data_w + (1.0 - alpha) * acc / acc.sum())
