"""Growing the classifier head when the catalog gains categories (DESIGN.md contract 4).

A pure function of arrays: the strategy decides *when* to grow, this module only
*how*. Old rows are copied bit for bit, so every old class's logit is unchanged
until training moves it; new rows are initialised per ``head-init``:

- ``"mean"``: the mean of the old rows (new classes start as "an average class",
  which keeps their logits in the range of the old ones) plus small noise to break
  symmetry between several new rows; bias = mean of the old biases;
- ``"random"``: normal with the old rows' standard deviation, bias = min old bias
  (new classes start unlikely, so old predictions are not disturbed);
- ``"zeros"``: zero weights and zero bias (optimizer-state growth uses this too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

HEAD_INITS = ("mean", "random", "zeros")
HEAD_ALIGNS = ("none", "norm", "norm-bias")


def grow_rows(
    array: np.ndarray, new_n: int, init: str = "zeros", seed: int = 0
) -> np.ndarray:
    """Return ``array`` with rows appended up to ``new_n`` (axis 0); a copy always."""
    old_n = array.shape[0]
    if new_n < old_n:
        raise ValueError(f"cannot shrink a head from {old_n} to {new_n} rows")
    if init not in HEAD_INITS:
        raise ValueError(f"head-init must be one of {HEAD_INITS}, got {init!r}")
    extra_shape = (new_n - old_n, *array.shape[1:])
    if init == "zeros" or old_n == 0:
        extra = np.zeros(extra_shape, dtype=array.dtype)
    elif init == "mean":
        rng = np.random.default_rng(seed)
        mean = array.mean(axis=0, keepdims=True)
        scale = 0.01 * (float(array.std()) or 1.0)
        extra = mean + rng.normal(0.0, scale, extra_shape)
        if array.ndim == 1:  # a bias: no noise, the mean of the old biases
            extra = np.broadcast_to(mean, extra_shape).copy()
    else:  # random
        rng = np.random.default_rng(seed)
        if array.ndim == 1:
            extra = np.full(extra_shape, array.min())
        else:
            extra = rng.normal(0.0, float(array.std()) or 0.01, extra_shape)
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


def align_new_rows(
    weight: np.ndarray, old: Sequence[int], new: Sequence[int]
) -> tuple[np.ndarray, float]:
    """Scale the ``new`` rows so their mean norm equals the ``old`` rows' mean norm.

    Weight aligning (Zhao et al., CVPR 2020): after a growth the rows of classes
    trained for fewer rounds, or by fewer nodes, end up with a different scale
    than the old ones, and the argmax favours whichever group is larger. Matching
    the mean row norms removes that bias without touching the rows' directions.
    Returns the new weight (a copy) and the factor applied (1.0 if nothing to do).
    """
    out = np.array(weight, copy=True)
    if not old or not new:
        return out, 1.0
    flat = out.reshape(out.shape[0], -1)
    old_norm = float(np.linalg.norm(flat[list(old)], axis=1).mean())
    new_norm = float(np.linalg.norm(flat[list(new)], axis=1).mean())
    if not (np.isfinite(old_norm) and np.isfinite(new_norm)) or new_norm == 0.0:
        return out, 1.0
    gamma = old_norm / new_norm
    out[list(new)] *= np.asarray(gamma, dtype=out.dtype)
    return out, gamma


def align_new_biases(
    bias: np.ndarray, old: Sequence[int], new: Sequence[int]
) -> tuple[np.ndarray, float]:
    """Shift the ``new`` biases so their mean equals the ``old`` biases' mean.

    The companion of :func:`align_new_rows` for ``head-align="norm-bias"``: the
    norms set the logits' scale, the biases their offset, and a group whose
    biases sit lower is predicted less whatever its rows say. Returns the new
    bias (a copy) and the shift applied.
    """
    out = np.array(bias, copy=True)
    if not old or not new:
        return out, 0.0
    shift = float(out[list(old)].mean() - out[list(new)].mean())
    if not np.isfinite(shift):
        return out, 0.0
    out[list(new)] += np.asarray(shift, dtype=out.dtype)
    return out, shift
