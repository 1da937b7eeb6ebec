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


def _record(arrays: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


MIXED_REF = {
    "conv": np.zeros((8, 3, 3, 3), np.float32),  # packed
    "bias": np.zeros(8, np.float32),  # packed
    "scale": np.zeros((), np.float32),  # packed
    "empty": np.zeros((0, 4), np.float32),
    "steps": np.zeros(2, np.int64),
    "fc": np.zeros((40, 30), np.float32),  # >= chunk: viewed in place
}


def _mixed_updates(n: int, seed: int) -> list[tuple[dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    return [
        (
            {
                k: (
                    rng.integers(0, 50, v.shape)
                    if v.dtype.kind == "i"
                    else rng.normal(size=v.shape)
                ).astype(v.dtype)
                for k, v in MIXED_REF.items()
            },
            float(w),
        )
        for w in rng.integers(1, 100, size=n)
    ]


@pytest.mark.parametrize("kwargs", [{"group": 2}, {"group": 4, "threads": 2}, {}])
def test_add_record_takes_flower_arrays_byte_for_byte_and_equals_add(kwargs) -> None:  # type: ignore[no-untyped-def]
    """Records saved by this numpy take the fast path (no general-path record)
    and give bit-for-bit what ``add`` gives on the same arrays."""
    ups = _mixed_updates(7, 3)
    by_add = StreamingMean(MIXED_REF, chunk=1000, **kwargs)
    by_record = StreamingMean(MIXED_REF, chunk=1000, **kwargs)
    for arrays, w in ups:
        by_add.add(arrays, w)
        assert by_record.add_record(_record(arrays), w) is None
    assert by_record.general_path == 0
    want, got = by_add.result(), by_record.result()
    for k in MIXED_REF:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])


def test_add_record_takes_keys_in_any_order_on_the_fast_path() -> None:
    """A reply listing its arrays in another order than the reference is read
    by name, still byte for byte, and folds to the same mean."""
    ups = _mixed_updates(5, 7)
    ordered = StreamingMean(MIXED_REF, chunk=1000, group=2)
    shuffled = StreamingMean(MIXED_REF, chunk=1000, group=2)
    for arrays, w in ups:
        assert ordered.add_record(_record(arrays), w) is None
        backwards = dict(reversed(list(arrays.items())))
        assert shuffled.add_record(_record(backwards), w) is None
    assert shuffled.general_path == 0
    want, got = ordered.result(), shuffled.result()
    assert list(got) == list(MIXED_REF)
    for k in MIXED_REF:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("blas", [True, False])
def test_fold_without_in_place_saxpy_equals_the_weighted_mean(  # type: ignore[no-untyped-def]
    monkeypatch, blas: bool
) -> None:
    """Where scipy's saxpy does not add in place (or is missing), the fold takes
    axpy's checked path (BLAS with a copy-back, or numpy's two passes)."""
    from fedobj.aggregation import fold

    monkeypatch.setattr(fold, "SAXPY_IN_PLACE", False)
    if not blas:
        monkeypatch.setattr(fold, "saxpy", None)
    ups = _mixed_updates(6, 8)
    mean = StreamingMean(MIXED_REF, chunk=1000, group=4)
    for arrays, w in ups:
        assert mean.add_record(_record(arrays), w) is None
    got = mean.result()
    total = sum(w for _, w in ups)
    for k, v in MIXED_REF.items():
        expected = sum(a[k].astype(np.float64) * w for a, w in ups) / total
        if v.dtype.kind == "i":
            np.testing.assert_array_equal(got[k], np.rint(expected))
        else:
            np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: a.__setitem__("fc", a["fc"].reshape(30, 40)), "fc has shape"),
        (lambda a: a.__setitem__("bias", a["bias"][:, None]), "bias has shape"),
        (lambda a: a.pop("steps"), "array names differ"),
        (lambda a: a.__setitem__("extra", np.zeros(2, np.float32)), "array names"),
    ],
)
def test_add_record_refuses_a_misshapen_update_at_once(change, reason) -> None:  # type: ignore[no-untyped-def]
    ups = _mixed_updates(3, 4)
    bad = {k: v.copy() for k, v in ups[1][0].items()}
    change(bad)
    mean = StreamingMean(MIXED_REF, chunk=1000, group=2)
    assert mean.add_record(_record(ups[0][0]), ups[0][1]) is None
    got = mean.add_record(_record(bad), 5.0)
    assert got is not None and got.startswith(reason)
    assert mean.count == 1
    assert mean.add_record(_record(ups[2][0]), ups[2][1]) is None
    clean = StreamingMean(MIXED_REF, chunk=1000, group=2)
    for arrays, w in (ups[0], ups[2]):
        clean.add(arrays, w)
    want, result = clean.result(), mean.result()
    for k in MIXED_REF:
        np.testing.assert_array_equal(result[k], want[k])


@pytest.mark.parametrize(
    "kwargs", [{"group": 2}, {"group": 3, "threads": 2}, {"group": 1}, {}]
)
@pytest.mark.parametrize(
    ("change", "name"),
    [
        (lambda a: a["bias"].__setitem__(3, np.nan), "bias"),  # packed
        (lambda a: a["scale"].fill(np.inf), "scale"),  # packed
        (lambda a: a["fc"].__setitem__((5, 7), -np.inf), "fc"),  # 1st chunk of fc
        (lambda a: a["fc"].__setitem__((39, 29), np.nan), "fc"),  # its 2nd chunk
        (lambda a: a["fc"].fill(np.nan), "fc"),  # every chunk
    ],
)
def test_non_finite_update_is_refused_as_it_is_folded(kwargs, change, name) -> None:  # type: ignore[no-untyped-def]
    """Values are checked in the fold: the update is refused before anything of
    its group reaches the sums, reported with its tag by ``flush``, and the mean
    is that of the others (bit for bit when they fold in the same groups)."""
    ups = _mixed_updates(5, 4)
    bad = {k: v.copy() for k, v in ups[1][0].items()}
    change(bad)
    mean = StreamingMean(MIXED_REF, chunk=1000, **kwargs)
    tagged = [(ups[0][0], ups[0][1], "a"), (bad, 7.0, "bad")]
    tagged += [(a, w, t) for (a, w), t in zip(ups[2:], "cde", strict=True)]
    for arrays, w, tag in tagged:
        assert mean.add_record(_record(arrays), w, tag) is None
    assert mean.flush() == [("bad", f"{name} contains NaN or infinite values")]
    assert mean.flush() == []
    assert mean.count == 4
    clean = StreamingMean(MIXED_REF, chunk=1000)
    for arrays, w in ups[:1] + ups[2:]:
        clean.add(arrays, w)
    want, result = clean.result(), mean.result()
    for k in MIXED_REF:
        assert result[k].dtype == want[k].dtype
        if not kwargs:  # one group in both
            np.testing.assert_array_equal(result[k], want[k])
        np.testing.assert_allclose(result[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"group": 2}, {"threads": 2}])
def test_a_refused_update_with_huge_finite_values_leaves_no_trace(kwargs) -> None:  # type: ignore[no-untyped-def]
    """A diverged node: 1e30 in the chunks folded first, infinity in its last.
    Summed in float32 with the others, 1e30 would swamp them; the group is summed
    again without it, so the mean is exactly the others' 0.5."""
    ref = {"w": np.zeros(2000, np.float32), "b": np.zeros(4, np.float32)}
    good = {"w": np.full(2000, 0.5, np.float32), "b": np.full(4, 0.5, np.float32)}
    diverged = {"w": np.full(2000, 1e30, np.float32), "b": good["b"]}
    diverged["w"][-1] = np.inf
    mean = StreamingMean(ref, chunk=500, **kwargs)
    for tag, arrays in enumerate([good, diverged, good, good]):
        assert mean.add_record(_record(arrays), 10.0, tag) is None
    assert mean.flush() == [(1, "w contains NaN or infinite values")]
    got = mean.result()
    np.testing.assert_array_equal(got["w"], np.full(2000, 0.5, np.float32))
    np.testing.assert_array_equal(got["b"], np.full(4, 0.5, np.float32))


def test_an_update_of_another_dtype_is_cast_and_folded_like_the_rest() -> None:
    """A float64 reply (general path) for a float32 key is folded in float32 by
    the same chunks as the others, so a NaN in a later reply's 2nd chunk takes
    only that reply out."""
    ref = {"w": np.zeros(2000, np.float32)}
    wide = {"w": np.full(2000, 1.0, np.float64)}
    bad = {"w": np.full(2000, 3.0, np.float32)}
    bad["w"][1500] = np.nan
    mean = StreamingMean(ref, chunk=1000)
    assert mean.add_record(_record(wide), 2.0, "wide") is None
    assert mean.add_record(_record(bad), 2.0, "bad") is None
    assert mean.general_path == 1
    assert [t for t, _ in mean.flush()] == ["bad"]
    np.testing.assert_array_equal(mean.result()["w"], np.ones(2000, np.float32))


def test_refusals_must_be_taken_before_the_result() -> None:
    """A caller that never flushes would count a refused update as folded:
    ``result`` says so instead of averaging quietly without it."""
    ref = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="refused while folding"):
        weighted_mean(
            [({"w": np.ones(3, np.float32)}, 1.0), ({"w": np.full(3, np.nan)}, 1.0)],
            ref,
        )


def test_a_mean_of_only_refused_updates_has_no_result() -> None:
    bad = {k: v.copy() for k, v in _mixed_updates(1, 6)[0][0].items()}
    bad["conv"][0, 0, 0, 0] = np.nan
    mean = StreamingMean(MIXED_REF, chunk=1000)
    assert mean.add_record(_record(bad), 3.0, 1) is None
    with pytest.raises(ValueError, match="refused"):
        mean.result()


def test_float32_overflow_of_finite_values_is_not_a_refusal() -> None:
    """Two finite 3e38 values overflow a float32 sum: the chunk is summed in
    float64 instead and nobody is refused."""
    ref = {"w": np.zeros(4, np.float32)}
    big = {"w": np.full(4, 3e38, np.float32)}
    mean = StreamingMean(ref)
    for tag in (1, 2):
        assert mean.add_record(_record(big), 1.0, tag) is None
    assert mean.flush() == []
    np.testing.assert_allclose(mean.result()["w"], 3e38, rtol=1e-6)


def test_add_record_takes_other_layouts_through_the_general_path() -> None:
    """A Fortran-order or float64 array is not this numpy's header for the
    reference: it is viewed, validated and folded as ``add`` would."""
    ups = _mixed_updates(2, 5)
    odd = dict(ups[1][0])
    odd["fc"] = np.asfortranarray(odd["fc"])
    odd["conv"] = odd["conv"].astype(np.float64)
    mean = StreamingMean(MIXED_REF, chunk=1000)
    assert mean.add_record(_record(ups[0][0]), ups[0][1]) is None
    assert mean.add_record(_record(odd), ups[1][1]) is None
    assert mean.general_path == 1
    got = mean.result()
    total = ups[0][1] + ups[1][1]
    expected = (
        ups[0][0]["fc"].astype(np.float64) * ups[0][1]
        + ups[1][0]["fc"].astype(np.float64) * ups[1][1]
    ) / total
    np.testing.assert_allclose(got["fc"], expected, rtol=1e-6, atol=1e-6)
    assert got["conv"].dtype == np.float32


def test_all_finite_is_exact_where_the_squares_overflow() -> None:
    from fedobj.aggregation import all_finite

    huge = np.full(10, 1e30, np.float32)  # finite, but its squares are not
    assert all_finite(huge)
    assert all_finite(np.arange(5))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((4, 5), np.float32)
        x[2, 3] = bad
        assert not all_finite(x)
        assert not all_finite(x.astype(np.float16))
        assert not all_finite(np.asfortranarray(x.astype(np.float64)))


def test_a_float64_key_with_nan_refuses_its_update_before_the_sums() -> None:
    """Keys that are not float32 (summed in float64, not staged) are checked
    whole before the group is committed."""
    ref = {"w": np.zeros(5, np.float64), "v": np.zeros(3, np.float32)}
    good = {"w": np.full(5, 2.0), "v": np.full(3, 2.0, np.float32)}
    bad = {"w": np.array([1.0, np.nan, 1.0, 1.0, 1.0]), "v": good["v"]}
    mean = StreamingMean(ref)
    assert mean.add_record(_record(good), 1.0, "good") is None
    assert mean.add_record(_record(bad), 1.0, "bad") is None
    assert mean.flush() == [("bad", "w contains NaN or infinite values")]
    got = mean.result()
    np.testing.assert_array_equal(got["w"], good["w"])
    np.testing.assert_array_equal(got["v"], good["v"])


def test_a_refused_update_with_a_huge_weight_leaves_no_trace() -> None:
    ref = {"w": np.zeros(4, np.float32)}
    mean = StreamingMean(ref)
    assert mean.add_record(_record({"w": np.full(4, 0.5, np.float32)}), 3.0, 1) is None
    bad = {"w": np.array([1, np.nan, 1, 1], np.float32)}
    assert mean.add_record(_record(bad), 1e20, 2) is None
    assert [t for t, _ in mean.flush()] == [2]
    assert mean.total_weight == 3.0
    np.testing.assert_array_equal(mean.result()["w"], np.full(4, 0.5, np.float32))


@pytest.mark.parametrize("weight", [0.0, 1e-50, -1.0, float("inf"), float("nan")])
def test_a_weight_float32_cannot_carry_is_refused(weight: float) -> None:
    """1e-50 is 0 in float32: BLAS would skip that term, and its NaNs with it."""
    mean = StreamingMean({"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="weight"):
        mean.add_record(_record({"w": np.ones(2, np.float32)}), weight)
    with pytest.raises(ValueError, match="weight"):
        mean.add({"w": np.ones(2, np.float32)}, weight)


def test_with_the_default_chunk_only_arrays_under_pack_below_are_packed() -> None:
    from fedobj.aggregation import PACK_BELOW

    ref = {
        "under": np.zeros(PACK_BELOW - 1, np.float32),
        "at": np.zeros(PACK_BELOW, np.float32),
        "bias": np.zeros(7, np.float32),
        "big": np.zeros((300, 300), np.float32),
    }
    mean = StreamingMean(ref)
    assert sorted(mean._packed) == ["bias", "under"]
    rng = np.random.default_rng(9)
    ups = [
        ({k: rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()}, w)
        for w in (3.0, 5.0, 11.0)
    ]
    for arrays, w in ups:
        assert mean.add_record(_record(arrays), w) is None
    got = mean.result()
    for k in ref:
        want = sum(a[k].astype(np.float64) * w for a, w in ups) / 19.0
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-6)


def test_bool_arrays_come_back_as_bools() -> None:
    """A bool buffer (a mask) is averaged and cast back as numpy casts it."""
    ref = {"w": np.zeros(3, np.float32), "mask": np.zeros(3, bool)}
    mean = StreamingMean(ref)
    for mask, w in (([True, False, True], 10.0), ([True, False, False], 5.0)):
        update = {"w": np.ones(3, np.float32), "mask": np.array(mask)}
        assert mean.add_record(_record(update), w) is None
    got = mean.result()
    assert got["mask"].dtype == bool
    np.testing.assert_array_equal(got["mask"], [True, False, True])


@pytest.mark.parametrize("kwargs", [{}, {"chunk": 7}, {"threads": 2}])
def test_a_group_sums_to_the_same_bits_in_any_arrival_order(kwargs) -> None:  # type: ignore[no-untyped-def]
    """Two runs of one seed must give one model: replies arrive in a race, and
    float32 sums in arrival order differ in their last bits."""
    rng = np.random.default_rng(11)
    ref = {
        "w": np.zeros((40, 30), np.float32),
        "b": np.zeros(30, np.float32),
        "s": np.zeros(5, np.float32),
    }
    ups = [
        (
            {
                k: (rng.normal(size=v.shape) * 10.0 ** rng.integers(-3, 4)).astype(
                    np.float32
                )
                for k, v in ref.items()
            },
            float(rng.choice([10, 10, 37])),  # equal weights: ties broken by values
        )
        for _ in range(8)
    ]

    def mean_of(order: list[int]) -> dict[str, bytes]:
        mean = StreamingMean(ref, **kwargs)
        for i in order:
            mean.add(*ups[i])
        return {k: v.tobytes() for k, v in mean.result().items()}

    first = mean_of(list(range(8)))
    for _ in range(12):
        assert mean_of([int(i) for i in rng.permutation(8)]) == first
