"""A model's arrays as one flat float32 vector, and back.

Compression works on the update as one vector: one int8 payload and one scale
array per reply instead of two per tensor (each Flower ``Array`` costs its name
and a 128-byte ``np.save`` header, which for a small model is visible in the
bytes a reply costs). The layout remembers where each tensor lives in the
vector, so quantisation chunks can restart at every tensor (a bias never shares
a scale with a weight matrix) and the vector can be cut back into the model's
arrays, in their own dtypes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

CHUNK = 256
"""Values per quantisation scale: a float32 scale per 256 int8 values costs 1.6%
of the payload (int8 then sends 3.94x fewer bytes than float32), and bounds each
value's rounding error by its own chunk's largest magnitude / 127."""


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's arrays, in the order they travel."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> Layout:
        """The layout of ``arrays`` (numpy arrays, or Flower ``Array``s)."""
        names, shapes, dtypes = [], [], []
        for name, value in arrays.items():
            names.append(str(name))
            shapes.append(tuple(int(d) for d in value.shape))
            dtypes.append(str(np.dtype(value.dtype)))
        return cls(tuple(names), tuple(shapes), tuple(dtypes))

    @cached_property
    def sizes(self) -> np.ndarray:
        """Values per tensor."""
        return np.array([math.prod(s) for s in self.shapes], dtype=np.int64)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Where each tensor starts in the flat vector."""
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @cached_property
    def size(self) -> int:
        """Values in the flat vector."""
        return int(self.sizes.sum())

    @cached_property
    def digest(self) -> str:
        """A short fingerprint of names and shapes: two layouts with the same
        digest cut the flat vector the same way."""
        text = ";".join(f"{n}:{s}" for n, s in zip(self.names, self.shapes))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    @cached_property
    def chunk_starts(self) -> np.ndarray:
        """Start of every quantisation chunk: every :data:`CHUNK` values, and
        afresh at each tensor (empty tensors have none)."""
        starts = [
            np.arange(off, off + size, CHUNK, dtype=np.int64)
            for off, size in zip(self.offsets, self.sizes)
            if size > 0
        ]
        return np.concatenate(starts) if starts else np.zeros(0, np.int64)

    @cached_property
    def chunk_lengths(self) -> np.ndarray:
        """Values in each chunk (the last of a tensor may be short)."""
        return np.diff(np.append(self.chunk_starts, self.size)).astype(np.int64)

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The arrays as one new float32 vector, in this layout's order."""
        out = np.empty(self.size, np.float32)
        for name, off, size in zip(self.names, self.offsets, self.sizes):
            out[off : off + size] = np.asarray(arrays[name]).reshape(-1)
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The flat vector cut back into arrays of this layout's shapes and
        dtypes (integers rounded, as the streaming mean rounds them)."""
        out: dict[str, np.ndarray] = {}
        for name, shape, dtype, off, size in zip(
            self.names, self.shapes, self.dtypes, self.offsets, self.sizes
        ):
            part = flat[off : off + size].reshape(shape)
            dt = np.dtype(dtype)
            if dt.kind in "iu":
                out[name] = np.rint(part).astype(dt)
            else:
                out[name] = part.astype(dt, copy=True)
        return out
