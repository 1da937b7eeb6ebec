"""An update as the arrays a compressed reply carries, and those arrays read back.

Codecs (run-config ``update-compression``):

- ``int8``: every value of the update, quantised to int8 with a scale per chunk
  (:mod:`fedobj.compression.quantize`). Arrays ``q`` (int8, one per value) and
  ``scale`` (float32, one per chunk).
- ``topk``: the largest-magnitude ``topk-fraction`` of each tensor's update, as
  int8 values (``q``, ``scale``: chunks of the kept values in order) and their
  indices (``counts``, ``offsets``: :mod:`fedobj.compression.sparse`). What is
  not sent stays on the node as its residual (:mod:`fedobj.compression.feedback`).

:func:`read_update` is the server's check of a reply (DESIGN.md contract 5 for
compressed replies): the arrays named, their dtypes and lengths against the
broadcast model's layout, finite non-negative scales small enough that no
dequantised value overflows, indices in range, unique and ordered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedobj.compression.layout import CHUNK, Layout
from fedobj.compression.quantize import MAX_LEVEL, dequantize, quantize
from fedobj.compression.sparse import (
    BadIndices,
    decode_indices,
    encode_indices,
    num_blocks,
    select_topk,
)

CODECS = ("none", "int8", "topk")

MAX_SCALE = float(np.finfo(np.float32).max) / (2 * MAX_LEVEL)
"""The largest scale a reply may carry: any larger and a dequantised value (or
the sum of two) would overflow float32."""


class CodecError(ValueError):
    """A compressed reply that must not be folded: says why."""


def kept_starts(count: int) -> np.ndarray:
    """Chunk starts over ``count`` kept values (top-k's scales)."""
    return np.arange(0, count, CHUNK, dtype=np.int64)


def encode_int8(
    delta: np.ndarray,
    layout: Layout,
    rng: np.random.Generator,
    bound: float | None = None,
) -> dict[str, np.ndarray]:
    """The whole update, int8 with a scale per chunk; with ``bound``, scaled so
    that what it stands for has an L2 norm of at most ``bound``."""
    q, scales = quantize(delta, layout.chunk_starts, rng)
    if bound is not None:
        scales = scales * within(dequantize(q, scales, layout.chunk_starts), bound)
    return {"q": q, "scale": scales}


def within(sent: np.ndarray, bound: float) -> np.float32:
    """The factor (<= 1) that brings ``sent``'s L2 norm within ``bound``.

    Central DP's client-side clipping bounds the dense update; quantisation
    noise, or top-k's residual added back, could take the update actually sent
    past the bound, and the server's noise is sized by it.
    """
    norm = float(np.linalg.norm(sent.astype(np.float64)))
    if norm <= bound or norm == 0.0:
        return np.float32(1.0)
    return np.float32(bound / norm * (1 - 1e-6))  # float32 rounding stays inside


def encode_topk_feedback(
    delta: np.ndarray,
    residual: np.ndarray,
    layout: Layout,
    fraction: float,
    rng: np.random.Generator,
    bound: float | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Top-k with error feedback: the arrays to send for ``delta`` plus the
    ``residual`` left from earlier rounds, and the new residual (everything not
    sent, quantisation error included), so that over any number of rounds what
    was sent plus what is left equals the sum of the true updates."""
    target = delta + residual
    arrays, idx, sent = encode_topk(target, layout, fraction, rng)
    if bound is not None:
        factor = within(sent, bound)
        arrays["scale"] = arrays["scale"] * factor
        sent = sent * factor
    target[idx] -= sent
    return arrays, target


def encode_topk(
    target: np.ndarray, layout: Layout, fraction: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The top ``fraction`` of each tensor of ``target``: the arrays to send,
    the indices sent and the float32 values they stand for once dequantised
    (what the server will add). Nodes use :func:`encode_topk_feedback`."""
    idx = select_topk(target, layout, fraction)
    starts = kept_starts(idx.size)
    q, scales = quantize(target[idx], starts, rng)
    counts, offsets = encode_indices(idx, layout.size)
    sent = dequantize(q, scales, starts)
    arrays = {"q": q, "scale": scales, "counts": counts, "offsets": offsets}
    return arrays, idx, sent


@dataclass(frozen=True)
class Update:
    """A validated compressed update: what :meth:`fold_into` adds, nothing
    decoded to a full float32 vector."""

    codec: str
    q: np.ndarray
    scales: np.ndarray
    idx: np.ndarray | None  # top-k's flat indices; None: every value (int8)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.idx is None else self.idx.size * 2  # as sent
        return int(self.q.nbytes + self.scales.nbytes + extra)

    def fingerprint(self) -> bytes:
        """The leading bytes of the payload: orders a group of updates
        canonically, whichever arrived first."""
        return bytes(self.q[:64].tobytes()) + bytes(self.scales[:16].tobytes())

    def fold_into(
        self, sums: np.ndarray, weight: float, layout: Layout, span: int = 1 << 16
    ) -> None:
        """``sums += weight * update`` (float64 ``sums``, flat), dequantised a
        span of chunks at a time so no full float32 copy of the update is made."""
        w = np.float32(weight)
        if self.idx is not None:
            values = dequantize(self.q, self.scales, kept_starts(self.q.size))
            values *= w
            sums[self.idx] += values
            return
        starts, lengths = layout.chunk_starts, layout.chunk_lengths
        step = max(1, span // CHUNK)
        for c0 in range(0, starts.size, step):
            c1 = min(c0 + step, starts.size)
            a = int(starts[c0])
            b = int(starts[c1]) if c1 < starts.size else layout.size
            part = self.q[a:b].astype(np.float32)
            part *= np.repeat(self.scales[c0:c1] * w, lengths[c0:c1])
            sums[a:b] += part

    def dense(self, layout: Layout) -> np.ndarray:
        """The update as a full float32 vector (for strategies that need every
        reply whole: FedAdam, Flower's DP wrappers)."""
        if self.idx is None:
            return dequantize(self.q, self.scales, layout.chunk_starts)
        out = np.zeros(layout.size, np.float32)
        out[self.idx] = dequantize(self.q, self.scales, kept_starts(self.q.size))
        return out


def _array(arrays: Mapping[str, np.ndarray], name: str, dtype: type) -> np.ndarray:
    if name not in arrays:
        raise CodecError(f"compressed update has no array {name!r}")
    arr = arrays[name]
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise CodecError(
            f"compressed array {name!r} must be 1-D {np.dtype(dtype).name}, got "
            f"{arr.ndim}-D {arr.dtype.name}"
        )
    return arr


def _check_scales(scales: np.ndarray, chunks: int) -> None:
    if scales.size != chunks:
        raise CodecError(f"{scales.size} scales for {chunks} chunks")
    if scales.size and not (np.isfinite(scales).all() and scales.min() >= 0):
        raise CodecError("scales must be finite and >= 0 (NaN, inf or negative)")
    if scales.size and float(scales.max()) > MAX_SCALE:
        raise CodecError(f"a scale of {float(scales.max()):.3g} would overflow")


def read_update(arrays: Mapping[str, np.ndarray], codec: str, layout: Layout) -> Update:
    """Validate a compressed reply's arrays against the broadcast ``layout``;
    raises :class:`CodecError` saying what is wrong."""
    if codec not in ("int8", "topk"):
        raise CodecError(f"unknown codec {codec!r}")
    names = {"q", "scale"} | ({"counts", "offsets"} if codec == "topk" else set())
    extra = set(arrays) - names
    if extra:
        raise CodecError(f"compressed update has unexpected arrays {sorted(extra)}")
    q = _array(arrays, "q", np.int8)
    scales = _array(arrays, "scale", np.float32)
    if codec == "int8":
        if q.size != layout.size:
            raise CodecError(
                f"int8 update has {q.size} values, the broadcast model {layout.size}"
            )
        _check_scales(scales, layout.chunk_starts.size)
        return Update(codec, q, scales, None)
    counts = _array(arrays, "counts", np.uint8)
    offsets = _array(arrays, "offsets", np.uint8)
    if q.size != offsets.size:
        raise CodecError(f"{q.size} values for {offsets.size} indices")
    if counts.size != num_blocks(layout.size):
        raise CodecError(
            f"{counts.size} index blocks, the broadcast model has "
            f"{num_blocks(layout.size)}"
        )
    try:
        idx = decode_indices(counts, offsets, layout.size)
    except BadIndices as exc:
        raise CodecError(str(exc)) from None
    _check_scales(scales, kept_starts(q.size).size)
    return Update(codec, q, scales, idx)
