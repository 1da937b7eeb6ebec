"""Aggregation maths, numpy only: update validation, PerfFedAvg weights, and a
streaming weighted mean.

Flower's ``aggregate_arrayrecords`` checks no shapes (a size-1 dimension broadcasts
silently; other mismatches crash the run) and holds every reply until the end. Here a
reply is validated against the broadcast model first (DESIGN.md contract 5), then
folded into running sums and dropped, so memory does not grow with the number of
nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def validate_update(
    arrays: Mapping[str, np.ndarray], reference: Shapes, num_examples: float
) -> str | None:
    """Why this update must not be aggregated, or ``None`` if it may.

    Checks: a positive, finite example count; exactly the broadcast model's array
    names; each shape equal to the broadcast one (no broadcasting); finite values.
    """
    if not (isinstance(num_examples, (int, float)) and math.isfinite(num_examples)):
        return f"num-examples is not a finite number ({num_examples!r})"
    if num_examples <= 0:
        return f"num-examples must be > 0, got {num_examples}"
    missing = set(reference) - set(arrays)
    extra = set(arrays) - set(reference)
    if missing or extra:
        return (
            f"array names differ from the broadcast model (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    for key, shape in reference.items():
        got = tuple(arrays[key].shape)
        if got != tuple(shape):
            return f"{key} has shape {got}, the broadcast model has {tuple(shape)}"
    for key, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"{key} contains NaN or infinite values"
    return None


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
    if not reported or sum(reported) <= 0:
        return np.asarray(data_w)
    mean_acc = float(np.mean(reported))
    acc = np.asarray([mean_acc if a is None else a for a in accuracies], np.float64)
    return np.asarray(alpha * data_w + (1.0 - alpha) * acc / acc.sum())


class StreamingMean:
    """Weighted mean of array dicts, folded one update at a time.

    Sums are kept in float64 (one buffer per array, allocated once) so that hundreds
    of float32 updates lose no precision; each update is folded in place and can be
    dropped right after. ``result()`` returns float32 arrays (the dtype of the model)
    or the reference dtype for non-float arrays.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.dtypes = {k: v.dtype for k, v in reference.items()}
        self.sums = {
            k: np.zeros(v.shape, dtype=np.float64) for k, v in reference.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be a positive finite number, got {weight}")
        for key, acc in self.sums.items():
            # acc += weight * x, without a float64 temporary of the whole array
            np.add(acc, np.multiply(arrays[key], weight, dtype=np.float64), out=acc)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no update was added")
        out = {}
        for key, acc in self.sums.items():
            mean = acc / self.total_weight
            dtype = self.dtypes[key]
            if dtype.kind in "iu":
                mean = np.rint(mean)
            out[key] = mean.astype(dtype, copy=False)
        return out


def weighted_mean(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
    reference: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Convenience: fold every ``(arrays, weight)`` into a :class:`StreamingMean`."""
    mean = StreamingMean(reference)
    for arrays, weight in updates:
        mean.add(arrays, weight)
    return mean.result()
