"""Whether a node's update may be aggregated (DESIGN.md contract 5).

Flower's ``aggregate_arrayrecords`` checks no shapes: a size-1 dimension broadcasts
silently and other mismatches crash the run. Here an update is checked against the
broadcast model instead: names and shapes as it arrives, values as it is folded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
        if not all_finite(arr):
            return f"{key} contains NaN or infinite values"
    return None


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value of ``arr`` is finite (integers always are).

    For float32/64 a dot product with itself first: BLAS reads the array once,
    with no boolean temporary, and the sum of squares is finite unless some
    value is NaN or infinite (or so large, > 1e19 in float32, that the squares
    overflow: then the exact, slower test decides).
    """
    if arr.dtype.kind != "f":
        return True
    if arr.dtype in (np.float32, np.float64) and arr.flags.c_contiguous:
        flat = arr.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            square_sum = float(np.dot(flat, flat))
        if math.isfinite(square_sum):
            return True
    return bool(np.isfinite(arr).all())
