"""Update validation, PerfFedAvg weights and the streaming mean, hand-computed."""

from __future__ import annotations

import numpy as np
import pytest

from fedobj.aggregation import (
    StreamingMean,
    perf_fedavg_weights,
    shapes_of,
    validate_update,
    weighted_mean,
)

REF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}


def test_validate_update_accepts_a_good_update() -> None:
    ok = {"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}
    assert validate_update(ok, shapes_of(REF), 10) is None


@pytest.mark.parametrize(
    "arrays,n,reason",
    [
        ({"w": np.ones((3, 2)), "b": np.ones(3)}, 0, "num-examples must be > 0"),
        ({"w": np.ones((3, 2)), "b": np.ones(3)}, float("nan"), "finite"),
        ({"w": np.ones((2, 2)), "b": np.ones(3)}, 5, "w has shape (2, 2)"),
        (
            {"w": np.ones((1, 2)), "b": np.ones(3)},
            5,
            "w has shape (1, 2)",
        ),  # no broadcast
        ({"w": np.ones((3, 2))}, 5, "missing ['b']"),
        ({"w": np.ones((3, 2)), "b": np.ones(3), "x": np.ones(1)}, 5, "unexpected"),
        ({"w": np.full((3, 2), np.nan), "b": np.ones(3)}, 5, "NaN or infinite"),
        ({"w": np.ones((3, 2)), "b": np.array([1, np.inf, 0])}, 5, "NaN or infinite"),
    ],
)
def test_validate_update_rejects_with_reason(arrays, n, reason: str) -> None:
    got = validate_update(arrays, shapes_of(REF), n)
    assert got is not None and reason in got, got


def test_perf_fedavg_weights_hand_computed() -> None:
    w = perf_fedavg_weights([100, 300], [0.5, 0.25], alpha=0.5)
    # 0.5 * [0.25, 0.75] + 0.5 * [2/3, 1/3]
    np.testing.assert_allclose(w, [0.5 * 0.25 + 0.5 * 2 / 3, 0.5 * 0.75 + 0.5 / 3])
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(
        perf_fedavg_weights([1, 3], [0.9, 0.1], 1.0), [0.25, 0.75]
    )
    np.testing.assert_allclose(
        perf_fedavg_weights([1, 3], [None, None], 0.2), [0.25, 0.75]
    )
    mixed = perf_fedavg_weights([1, 1], [0.8, None], 0.0)
    np.testing.assert_allclose(mixed, [0.5, 0.5])
    with pytest.raises(ValueError):
        perf_fedavg_weights([1], [0.5], 1.5)


def test_streaming_mean_equals_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    ups = [
        (
            {
                "w": rng.normal(size=(3, 2)).astype(np.float32),
                "b": rng.normal(size=3).astype(np.float32),
                "n": np.array(k, np.int64),
            },
            float(k + 1),
        )
        for k in range(5)
    ]
    ref = {"w": REF["w"], "b": REF["b"], "n": np.array(0, np.int64)}
    got = weighted_mean(ups, ref)
    ws = np.array([u[1] for u in ups]) / sum(u[1] for u in ups)
    want_w = sum(wk * u[0]["w"].astype(np.float64) for wk, u in zip(ws, ups))
    np.testing.assert_allclose(got["w"], want_w, rtol=1e-6)
    assert got["w"].dtype == np.float32 and got["n"].dtype == np.int64
    assert int(got["n"]) == round(sum(wk * k for wk, k in zip(ws, range(5))))
    with pytest.raises(ValueError):
        StreamingMean(ref).result()
    with pytest.raises(ValueError):
        StreamingMean(ref).add(ups[0][0], 0.0)


def test_array_view_is_zero_copy_and_exact() -> None:
    from flwr.app import Array

    from fedobj.aggregation import array_view

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    arr = Array(x)
    view = array_view(arr)
    np.testing.assert_array_equal(view, x)
    assert not view.flags.writeable  # a view of the message's bytes
    assert np.shares_memory(view, np.frombuffer(arr.data, dtype=np.uint8))
    fortran = Array(np.asfortranarray(x))  # saved in Fortran order: falls back
    np.testing.assert_array_equal(array_view(fortran), x)


@pytest.mark.parametrize(
    "kwargs", [{}, {"group": 1}, {"group": 3, "chunk": 7}, {"threads": 2}]
)
def test_streaming_mean_groups_chunks_and_threads_agree(kwargs) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    ref = {"big": np.zeros((50, 40), np.float32), "small": np.zeros(3, np.float32)}
    ups = [
        (
            {k: rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()},
            float(w),
        )
        for w in rng.integers(1, 100, size=11)
    ]
    mean = StreamingMean(ref, **kwargs)
    for arrays, w in ups:
        mean.add(arrays, w)
    got = mean.result()
    total = sum(w for _, w in ups)
    for k in ref:
        expected = sum(a[k].astype(np.float64) * w for a, w in ups) / total
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-6)
        assert got[k].dtype == np.float32


@pytest.mark.parametrize("kwargs", [{"group": 2}, {"group": 4, "threads": 2}, {}])
def test_small_arrays_packed_per_update_fold_back_to_their_keys(kwargs) -> None:  # type: ignore[no-untyped-def]
    """Arrays under a chunk are packed into one buffer per update (reused between
    groups); each comes back under its own key, shape and dtype, exactly averaged,
    next to large, integer, scalar and empty arrays that are not packed."""
    rng = np.random.default_rng(2)
    ref = {
        "conv": np.zeros((8, 3, 3, 3), np.float32),  # 216 values: packed
        "bias": np.zeros(8, np.float32),  # packed
        "scale": np.zeros((), np.float32),  # a scalar: packed
        "empty": np.zeros((0, 4), np.float32),  # nothing to pack
        "steps": np.zeros(2, np.int64),  # integer: never packed
        "fc": np.zeros((40, 30), np.float32),  # 1,200 values >= chunk: not packed
    }
    ups = [
        (
            {
                k: (
                    rng.integers(0, 50, v.shape)
                    if v.dtype.kind == "i"
                    else rng.normal(size=v.shape)
                ).astype(v.dtype)
                for k, v in ref.items()
            },
            float(w),
        )
        for w in rng.integers(1, 100, size=9)
    ]
    mean = StreamingMean(ref, chunk=1000, **kwargs)
    assert sorted(mean._packed) == ["bias", "conv", "scale"]
    for arrays, w in ups:
        mean.add(arrays, w)
    got = mean.result()
    assert list(got) == list(ref)
    total = sum(w for _, w in ups)
    for k, v in ref.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        expected = sum(a[k].astype(np.float64) * w for a, w in ups) / total
        if v.dtype.kind == "i":
            np.testing.assert_array_equal(got[k], np.rint(expected))
        else:
            np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-6)
    # the caller's dicts are left as they were (packing works on a copy)
    assert set(ups[0][0]) == set(ref)
