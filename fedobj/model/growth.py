"""Growing the classifier head when the catalog gains categories (DESIGN.md contract 4).

A pure function of arrays: the strategy decides *when* to grow, this module only
*how*. Old rows are copied bit for bit, so every old class's logit is unchanged
until training moves it; new rows are initialised by ``init``:

- ``"mean"`` (the head's): the mean of the old rows (new classes start as "an
  average class", which keeps their logits in the range of the old ones) plus
  small noise to break symmetry between several new rows; bias = mean of the old
  biases;
- ``"zeros"``: zero weights and zero bias (what optimizer-state growth uses).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

HEAD_INITS = ("mean", "zeros")


def grow_rows(
    array: np.ndarray, new_n: int, init: str = "zeros", seed: int = 0
) -> np.ndarray:
    """Return ``array`` with rows appended up to ``new_n`` (axis 0); a copy always."""
    old_n = array.shape[0]
    if new_n < old_n:
        raise ValueError(f"cannot shrink a head from {old_n} to {new_n} rows")
    if init not in HEAD_INITS:
        raise ValueError(f"init must be one of {HEAD_INITS}, got {init!r}")
    extra_shape = (new_n - old_n, *array.shape[1:])
    if init == "zeros" or old_n == 0:
        extra = np.zeros(extra_shape, dtype=array.dtype)
    else:  # mean
        rng = np.random.default_rng(seed)
        mean = array.mean(axis=0, keepdims=True)
        scale = 0.01 * (float(array.std()) or 1.0)
        extra = mean + rng.normal(0.0, scale, extra_shape)
        if array.ndim == 1:  # a bias: no noise, the mean of the old biases
            extra = np.broadcast_to(mean, extra_shape).copy()
    return np.concatenate([array, extra.astype(array.dtype)], axis=0)


def grow_head(
    arrays: Mapping[str, np.ndarray],
    head_keys: tuple[str, ...],
    old_n: int,
    new_n: int,
    init: str = "mean",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Arrays with the head (``head_keys``) grown from ``old_n`` to ``new_n`` rows.

    Every other array is passed through unchanged (same object). Raises if a head
    array does not have ``old_n`` rows, so growing twice or from the wrong snapshot
    fails loudly instead of silently misaligning rows and classes.
    """
    out = dict(arrays)
    for key in head_keys:
        if key not in arrays:
            raise KeyError(f"head array {key!r} not in the model's arrays")
        if arrays[key].shape[0] != old_n:
            raise ValueError(
                f"{key} has {arrays[key].shape[0]} rows, expected {old_n} before growth"
            )
        out[key] = grow_rows(arrays[key], new_n, init, seed)
    return out
