"""A node's images as in-memory tensors labelled by class-map index.

Data arrives as uint8 tensors already in memory (a node's partition is small), so the
loops index tensors directly instead of going through a DataLoader: no worker
processes, no per-sample Python, which matters when hundreds of virtual clients share
two cores. Labels are mapped through the class map here, once, so every loop trains
on the rows the server's head has.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from fedobj.classmap import ClassMap
from fedobj.data.fashion_mnist import ImageArrays

# Normalisation to roughly [-1, 1]; stored nowhere because every fedobj model uses it.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


@dataclass(frozen=True)
class LabelledTensors:
    """Images (uint8, N x C x H x W) and class-map indices (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MappedData:
    """A node's data mapped through the class map, with what could not be mapped."""

    tensors: LabelledTensors
    ignored: Counter[str]
    histogram: Counter[str]


def map_to_class_map(data: ImageArrays, class_map: ClassMap) -> MappedData:
    """Translate local label slugs to the class map's indices (DESIGN.md contract 2).

    Samples whose slug is not in the map are dropped and counted by slug; so are
    samples of inactive categories, which must not be trained on.
    """
    lookup = {e.slug: e.index for e in class_map.entries if e.active}
    table = np.array([lookup.get(s, -1) for s in data.label_slugs], dtype=np.int64)
    mapped = table[data.labels] if len(data) else np.zeros(0, dtype=np.int64)
    keep = mapped >= 0
    counts = np.bincount(data.labels, minlength=len(data.label_slugs))
    ignored = Counter(
        {
            s: int(counts[i])
            for i, s in enumerate(data.label_slugs)
            if table[i] < 0 and counts[i] > 0
        }
    )
    histogram = Counter(
        {
            s: int(counts[i])
            for i, s in enumerate(data.label_slugs)
            if table[i] >= 0 and counts[i] > 0
        }
    )
    return MappedData(
        LabelledTensors(
            torch.from_numpy(np.ascontiguousarray(data.images[keep])),
            torch.from_numpy(mapped[keep]),
        ),
        ignored,
        histogram,
    )


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> normalised float32 model input."""
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
