"""Top-k sparsification: which values of an update to send, and their indices.

A node sends the largest-magnitude fraction of each tensor's update. Indices
travel as one byte each: the flat vector is cut into blocks of :data:`BLOCK`
positions, and a kept value is named by its block's count (one byte per block)
and its offset inside the block (one byte per value). At 10% kept that is 1.04
bytes of index per value sent, against 4 for an int32 index; duplicates and
out-of-range offsets stay representable, so a malformed reply is caught by
:func:`decode_indices` rather than silently folded.
"""

from __future__ import annotations

import math

import numpy as np

from fedobj.compression.layout import Layout

BLOCK = 255
"""Positions per index block: offsets 0..254 and a count of at most 255 both fit
one unsigned byte."""


class BadIndices(ValueError):
    """A reply's indices are malformed (duplicated, unordered or out of range)."""


def keep_count(size: int, fraction: float) -> int:
    """Values of a tensor of ``size`` that top-k keeps: at least one."""
    if size <= 0:
        return 0
    return min(size, max(1, math.ceil(fraction * size)))


def select_topk(x: np.ndarray, layout: Layout, fraction: float) -> np.ndarray:
    """Sorted flat indices of the largest-magnitude ``fraction`` of every tensor."""
    picks = []
    magnitude = np.abs(x)
    for off, size in zip(layout.offsets, layout.sizes):
        k = keep_count(int(size), fraction)
        if k == 0:
            continue
        part = magnitude[off : off + size]
        if k < size:
            top = np.argpartition(part, size - k)[size - k :]
        else:
            top = np.arange(size)
        picks.append(top.astype(np.int64) + off)
    if not picks:
        return np.zeros(0, np.int64)
    idx = np.concatenate(picks)
    idx.sort()
    return idx


def num_blocks(size: int) -> int:
    return -(-size // BLOCK)


def encode_indices(idx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, offsets)`` (uint8 each) for sorted unique flat indices."""
    blocks = idx // BLOCK
    counts = np.bincount(blocks, minlength=num_blocks(size)).astype(np.uint8)
    offsets = (idx - blocks * BLOCK).astype(np.uint8)
    return counts, offsets


def decode_indices(counts: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """The flat indices ``(counts, offsets)`` name; raises :class:`BadIndices`
    for offsets past a block or the vector, duplicates or a wrong order."""
    expected = num_blocks(size)
    if counts.shape != (expected,):
        raise BadIndices(
            f"index counts have shape {counts.shape}, a vector of {size} "
            f"values has {expected} blocks"
        )
    total = int(counts.sum(dtype=np.int64))
    if total != offsets.size:
        raise BadIndices(
            f"index counts add up to {total}, but {offsets.size} offsets came"
        )
    if offsets.size and int(offsets.max()) >= BLOCK:
        raise BadIndices(f"index offset {int(offsets.max())} is past its block")
    blocks = np.repeat(np.arange(expected, dtype=np.int64), counts.astype(np.int64))
    idx = blocks * BLOCK + offsets.astype(np.int64)
    if idx.size and int(idx.max()) >= size:
        raise BadIndices(
            f"index {int(idx.max())} out of range for a vector of {size} values"
        )
    if idx.size > 1:
        steps = np.diff(idx)
        if (steps == 0).any():
            at = int(idx[1:][steps == 0][0])
            raise BadIndices(f"duplicate index {at}")
        if (steps < 0).any():
            raise BadIndices("indices are not in ascending order within a block")
    return idx
