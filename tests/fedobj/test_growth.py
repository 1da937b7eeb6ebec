"""Weight aligning of new head rows after a growth."""

from __future__ import annotations

import numpy as np
import pytest

from fedobj.model.growth import align_new_rows


def test_align_new_rows_matches_mean_norms_and_keeps_old_rows() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(10, 16)).astype(np.float32)
    weight[6:] *= 0.2  # new rows trained less: smaller
    aligned, gamma = align_new_rows(weight, list(range(6)), list(range(6, 10)))
    norms = np.linalg.norm(aligned, axis=1)
    assert gamma > 1
    assert np.isclose(norms[:6].mean(), norms[6:].mean(), rtol=1e-5)
    np.testing.assert_array_equal(aligned[:6], weight[:6])
    # directions unchanged
    cos = (aligned[6:] * weight[6:]).sum(1) / (
        norms[6:] * np.linalg.norm(weight[6:], axis=1)
    )
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_align_new_rows_without_a_group_is_identity() -> None:
    weight = np.ones((4, 3), dtype=np.float32)
    aligned, gamma = align_new_rows(weight, [0, 1], [])
    assert gamma == 1.0
    np.testing.assert_array_equal(aligned, weight)


def test_align_new_biases_matches_means_and_keeps_old() -> None:
    from fedobj.model.growth import align_new_biases

    bias = np.array([0.5, 0.7, 0.6, -2.0, -1.0], dtype=np.float32)
    out, shift = align_new_biases(bias, [0, 1, 2], [3, 4])
    assert shift == pytest.approx(0.6 - (-1.5))
    assert out[[3, 4]].mean() == pytest.approx(out[[0, 1, 2]].mean())
    np.testing.assert_array_equal(out[:3], bias[:3])
    assert out[3] - out[4] == pytest.approx(bias[3] - bias[4])  # order kept
