"""Property tests (hypothesis) for the edge link's maths: the int8 quantiser,
top-k's index code and error feedback, and the compressed mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedobj.compression import (
    CHUNK,
    CompressedMean,
    Layout,
    dequantize,
    encode_int8,
    quantize,
    read_update,
)
from fedobj.compression.codec import encode_topk_feedback
from fedobj.compression.sparse import BLOCK, decode_indices, encode_indices

FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _layout(*sizes: int) -> Layout:
    return Layout.of({f"t{i}": np.zeros(s, np.float32) for i, s in enumerate(sizes)})


@st.composite
def vectors(draw: st.DrawFn) -> tuple[Layout, np.ndarray]:
    """A layout of 1-4 tensors and a vector over it, with exact zeros mixed in."""
    sizes = draw(st.lists(st.integers(1, 700), min_size=1, max_size=4))
    layout = _layout(*sizes)
    x = draw(hnp.arrays(np.float32, layout.size, elements=FLOATS))
    zeros = draw(hnp.arrays(np.bool_, layout.size))
    x[zeros] = 0.0
    return layout, x


@settings(max_examples=60, deadline=None)
@given(case=vectors(), seed=st.integers(0, 2**32 - 1))
def test_quantiser_error_is_below_its_chunks_scale_and_zeros_stay_zero(
    case: tuple[Layout, np.ndarray], seed: int
) -> None:
    layout, x = case
    q, scales = quantize(x, layout.chunk_starts, np.random.default_rng(seed))
    back = dequantize(q, scales, layout.chunk_starts)
    per_value = np.repeat(scales, layout.chunk_lengths)
    # |error| < scale (one level); float32 arithmetic adds a rounding or two
    assert (np.abs(back - x) <= per_value * (1 + 1e-5)).all()
    assert (back[x == 0] == 0).all()
    # the scale is the chunk's largest magnitude over 127: no level is wasted
    peaks = np.maximum.reduceat(np.abs(x), layout.chunk_starts)
    np.testing.assert_allclose(scales * 127, peaks, rtol=1e-6)
    # a chunk never crosses a tensor's end, and is at most CHUNK long
    first = np.searchsorted(layout.offsets, layout.chunk_starts, side="right")
    last_value = layout.chunk_starts + layout.chunk_lengths - 1
    last = np.searchsorted(layout.offsets, last_value, side="right")
    np.testing.assert_array_equal(first, last)
    assert (layout.chunk_lengths <= CHUNK).all() and (layout.chunk_lengths > 0).all()


@settings(max_examples=20, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.integers(1, 300), elements=FLOATS),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantiser_is_unbiased(x: np.ndarray, seed: int) -> None:
    """The mean of many independent quantisations converges to x: within six
    standard deviations of stochastic rounding's (at most scale / 2 each)."""
    layout = _layout(x.size)
    rng = np.random.default_rng(seed)
    draws = 2000
    total = np.zeros(x.size, np.float64)
    for _ in range(draws):
        q, scales = quantize(x, layout.chunk_starts, rng)
        total += dequantize(q, scales, layout.chunk_starts)
    scale = np.repeat(scales, layout.chunk_lengths).astype(np.float64)
    sigma = scale / 2 / np.sqrt(draws)
    assert (np.abs(total / draws - x) <= 6 * sigma + 1e-6 * np.abs(x)).all()


def test_quantiser_is_biased_without_its_random_offsets() -> None:
    """The unbiasedness test can fail: round-to-nearest (no random offset)
    misses a value between two levels by the same amount every time."""
    x = np.full(256, 0.3, np.float32)
    x[0] = 127.0  # scale 1: 0.3 sits between levels 0 and 1
    layout = _layout(x.size)

    class Nearest:
        def random(self, n: int, dtype: type) -> np.ndarray:
            return np.full(n, 0.5, dtype)

    q, scales = quantize(x, layout.chunk_starts, Nearest())  # type: ignore[arg-type]
    assert dequantize(q, scales, layout.chunk_starts)[1] == 0.0  # always 0, not 0.3


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 3000),
    data=st.data(),
)
def test_index_code_round_trips(size: int, data: st.DataObject) -> None:
    idx = np.array(
        sorted(data.draw(st.sets(st.integers(0, size - 1), max_size=size))),
        dtype=np.int64,
    )
    counts, offsets = encode_indices(idx, size)
    assert counts.dtype == np.uint8 and offsets.dtype == np.uint8
    assert counts.size == -(-size // BLOCK) and offsets.size == idx.size
    np.testing.assert_array_equal(decode_indices(counts, offsets, size), idx)


@settings(max_examples=40, deadline=None)
@given(
    case=vectors(),
    rounds=st.integers(1, 6),
    fraction=st.sampled_from([0.01, 0.1, 0.3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_error_feedback_loses_nothing_over_rounds(
    case: tuple[Layout, np.ndarray], rounds: int, fraction: float, seed: int
) -> None:
    """Sent plus residual equals the sum of the true updates, every round."""
    layout, first = case
    rng = np.random.default_rng(seed)
    residual = np.zeros(layout.size, np.float32)
    truth = np.zeros(layout.size, np.float64)
    sent = np.zeros(layout.size, np.float64)
    for r in range(rounds):
        delta = first if r == 0 else rng.normal(size=layout.size).astype(np.float32)
        truth += delta
        arrays, residual = encode_topk_feedback(delta, residual, layout, fraction, rng)
        update = read_update(arrays, "topk", layout)
        sent += update.dense(layout)
        kept = update.idx.size
        assert kept <= sum(max(1, int(np.ceil(fraction * s))) for s in layout.sizes)
        scale = float(np.abs(truth).max()) + 1.0
        np.testing.assert_allclose(sent + residual, truth, atol=1e-5 * scale)


@settings(max_examples=30, deadline=None)
@given(case=vectors(), seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6))
def test_compressed_mean_is_the_weighted_mean_of_what_was_sent_in_any_order(
    case: tuple[Layout, np.ndarray], seed: int, n: int
) -> None:
    layout, base = case
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(n):
        delta = rng.normal(size=layout.size).astype(np.float32)
        codec = "int8" if i % 2 == 0 else "topk"
        if codec == "int8":
            arrays = encode_int8(delta, layout, rng)
        else:
            arrays, _ = encode_topk_feedback(
                delta, np.zeros_like(delta), layout, 0.2, rng
            )
        updates.append((read_update(arrays, codec, layout), float(rng.integers(1, 50))))
    means = []
    for order in (updates, updates[::-1]):
        mean = CompressedMean(layout, base, group_bytes=1 << 30)
        for update, weight in order:
            mean.add(update, weight)
        means.append(mean.result())
    total = sum(w for _, w in updates)
    exact = (
        base.astype(np.float64)
        + sum(w * u.dense(layout).astype(np.float64) for u, w in updates) / total
    )
    got = layout.flatten(means[0])
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
    for name in layout.names:  # arrival order changes no bit
        np.testing.assert_array_equal(means[0][name], means[1][name])


def test_compressed_mean_needs_a_positive_weight_and_an_update() -> None:
    layout = _layout(10)
    mean = CompressedMean(layout, np.zeros(10, np.float32))
    update = read_update(
        encode_int8(np.ones(10, np.float32), layout, np.random.default_rng(0)),
        "int8",
        layout,
    )
    with pytest.raises(ValueError, match="weight"):
        mean.add(update, float("nan"))
    with pytest.raises(ValueError, match="no update"):
        mean.result()
