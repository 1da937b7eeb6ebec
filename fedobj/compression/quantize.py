"""Unbiased int8 quantisation with one scale per chunk.

Each chunk of :data:`~fedobj.compression.layout.CHUNK` values is scaled by its
largest magnitude / 127 and rounded *stochastically*: up with probability equal
to the fraction, down otherwise. The expected value of the rounded update is the
update itself, so averaging many nodes' quantised updates converges to the
average of their true updates instead of drifting by a systematic rounding
bias; a value's error is below its chunk's scale, and zeros stay exactly zero.
"""

from __future__ import annotations

import hashlib

import numpy as np

MAX_LEVEL = 127
"""int8 levels used: -127..127 (symmetric; -128 is never produced)."""


def quantize(
    x: np.ndarray, starts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scales)``: ``x`` (float32, 1-D) as int8 levels and one float32
    scale per chunk; chunk ``i`` covers ``x[starts[i]:starts[i+1]]``."""
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.float32)
    peaks = np.maximum.reduceat(np.abs(x), starts)
    scales = (peaks / np.float32(MAX_LEVEL)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(scales > 0, np.float32(1) / scales, np.float32(0))
    lengths = np.diff(np.append(starts, x.size))
    y = x * np.repeat(inverse.astype(np.float32), lengths)
    y += rng.random(x.size, dtype=np.float32)
    np.floor(y, out=y)
    np.clip(y, -MAX_LEVEL, MAX_LEVEL, out=y)
    return y.astype(np.int8), scales


def dequantize(q: np.ndarray, scales: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The float32 values ``q`` stands for (the whole vector: for a node's own
    bookkeeping; the server folds chunk by chunk, see ``fedobj.compression.mean``)."""
    lengths = np.diff(np.append(starts, q.size))
    out: np.ndarray = q.astype(np.float32) * np.repeat(scales, lengths)
    return out


def seeded_rng(*parts: object) -> np.random.Generator:
    """A generator seeded by ``parts`` (a model id, a device, a codec): the
    same message quantised twice rounds the same way, so a seeded simulation
    repeats, and the server can compute what a device will decode."""
    text = "/".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))
