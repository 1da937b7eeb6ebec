"""The weighted mean of models that arrive as compressed deltas.

A compressed reply is ``base + update``: the model the round sent (every node
trains from the same one; with an int8 downlink, the published model) and the
node's quantised or sparse update. The mean of the models is then the base plus
the weighted mean of the updates; the updates are folded into one float64 sum as
they arrive (:meth:`fedobj.compression.codec.Update.fold_into`, a span of chunks
at a time), so the server never holds a float32 copy of a reply.

Replies are held in small groups and each group is folded in a canonical order
(by weight, then by the payload's leading bytes), as the dense streaming mean
does: float addition is not associative, and arrival order is a race.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedobj.compression.codec import Update
from fedobj.compression.layout import Layout

GROUP_BYTES = 64 * 2**20
"""Compressed payload held before a fold (a few MobileNetV3 int8 updates)."""


class CompressedMean:
    """Weighted mean of ``base + update`` over compressed replies; ``base`` is
    the round's model as a flat float32 vector in ``layout``."""

    def __init__(
        self,
        layout: Layout,
        base: np.ndarray,
        group_bytes: int = GROUP_BYTES,
    ) -> None:
        self.layout = layout
        self.base = base
        self.sums = np.zeros(layout.size, np.float64)
        self.total_weight = 0.0
        self.count = 0
        self.group_bytes = group_bytes
        self._pending: list[tuple[Update, float]] = []
        self._pending_bytes = 0

    def add(self, update: Update, weight: float) -> None:
        """Fold ``update`` (validated by ``read_update`` against this layout)
        with ``weight``."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight}")
        self._pending.append((update, float(weight)))
        self._pending_bytes += update.nbytes
        self.count += 1
        if self._pending_bytes >= self.group_bytes:
            self._fold()

    def flush(self) -> list[tuple[Any, str]]:
        """Fold what is pending. Nothing is refused here (a compressed update
        is checked whole before it is added); the list is for the dense
        mean's interface."""
        self._fold()
        return []

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        pending.sort(key=lambda p: (p[1], p[0].fingerprint()))
        for update, weight in pending:
            update.fold_into(self.sums, weight, self.layout)
            self.total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean model, as arrays of the layout's dtypes."""
        self._fold()
        if self.count == 0:
            raise ValueError("no update was added")
        mean = self.sums / self.total_weight
        mean += self.base
        return self.layout.unflatten(mean)
