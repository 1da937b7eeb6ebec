"""Where a node's (and the server's) data comes from, loaded once per process.

In simulation a node is a Ray actor that serves many virtual nodes; its data is a
deterministic partition of Fashion-MNIST found from ``partition-id`` /
``num-partitions`` in the node config. On a real SuperNode the node config names a
``data-dir`` image folder. Either way the result is cached in the process (an actor
handles many messages) and, for image folders, on disk (a SuperNode starts a fresh
process per message).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedobj.data.fashion_mnist import ImageArrays, load_fashion_mnist
from fedobj.data.image_folder import load_image_folder
from fedobj.data.partition import partition, train_eval_split
from fedobj.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeData:
    train: ImageArrays
    eval: ImageArrays
    source: str


def adapt_images(images: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Resize uint8 ``(N, C, H, W)`` to ``size`` and to 1 or 3 channels."""
    if images.shape[1] != channels:
        if channels == 3 and images.shape[1] == 1:
            images = np.repeat(images, 3, axis=1)
        elif channels == 1 and images.shape[1] == 3:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            images = np.tensordot(images.astype(np.float32), weights, axes=([1], [0]))
            images = np.clip(images.round(), 0, 255).astype(np.uint8)[:, None]
        else:
            raise ValueError(f"cannot map {images.shape[1]} channels to {channels}")
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(images), 1024):
        chunk = torch.from_numpy(images[start : start + 1024]).float()
        chunk = F.interpolate(
            chunk,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        out.append(chunk.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out) if out else images[:, :, :size, :size]


def _adapt(data: ImageArrays, channels: int, size: int) -> ImageArrays:
    return ImageArrays(
        adapt_images(data.images, channels, size), data.labels, data.label_slugs
    )


@functools.lru_cache(maxsize=4)
def _fashion_mnist(split: str, directory: str, channels: int, size: int) -> ImageArrays:
    return _adapt(load_fashion_mnist(split, directory or None), channels, size)


@functools.lru_cache(maxsize=4)
def _partitions(
    num_partitions: int,
    method: str,
    alpha: float,
    classes_per_node: int,
    seed: int,
    directory: str,
    channels: int,
    size: int,
) -> tuple[np.ndarray, ...]:
    labels = _fashion_mnist("train", directory, channels, size).labels
    return tuple(
        partition(labels, num_partitions, method, seed, alpha, classes_per_node)
    )


@functools.lru_cache(maxsize=64)
def _simulated_node(
    partition_id: int,
    num_partitions: int,
    method: str,
    alpha: float,
    classes_per_node: int,
    eval_fraction: float,
    seed: int,
    directory: str,
    channels: int,
    size: int,
    split: tuple[int, float] | None = None,
) -> NodeData:
    full = _fashion_mnist("train", directory, channels, size)
    parts = _partitions(
        num_partitions, method, alpha, classes_per_node, seed, directory, channels, size
    )
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id {partition_id} outside 0..{num_partitions - 1}"
        )
    mine = full.subset(parts[partition_id])
    if split is not None:
        first_new, new_fraction = split
        is_new = partition_id in new_category_nodes(num_partitions, new_fraction, seed)
        keep = mine.labels >= first_new if is_new else mine.labels < first_new
        mine = mine.subset(np.flatnonzero(keep))
    tr, ev = train_eval_split(len(mine), eval_fraction, seed + 7919 * partition_id)
    return NodeData(
        mine.subset(tr),
        mine.subset(ev),
        f"fashion-mnist partition {partition_id}/{num_partitions} ({method})",
    )


def new_category_nodes(num_partitions: int, fraction: float, seed: int) -> set[int]:
    """The simulated nodes that hold only new-category images (disjoint split).

    Used by the class-incremental scenario: the other nodes hold only images of
    the categories the catalog starts with; a seeded choice, the same in every actor.
    """
    n_new = int(round(fraction * num_partitions))
    order = np.random.default_rng(seed + 104_729).permutation(num_partitions)
    return {int(i) for i in order[:n_new]}


@functools.lru_cache(maxsize=4)
def _folder_node(
    data_dir: str,
    cache_dir: str,
    eval_fraction: float,
    seed: int,
    channels: int,
    size: int,
) -> NodeData:
    data, report = load_image_folder(data_dir, channels, size, cache_dir or None)
    report.warn_skipped(log, data_dir)
    tr, ev = train_eval_split(len(data), eval_fraction, seed)
    return NodeData(data.subset(tr), data.subset(ev), f"image folder {data_dir}")


def default_cache_dir() -> str:
    return os.environ.get("FEDOBJ_CACHE_DIR") or str(Path.home() / ".cache" / "fedobj")


def load_node_data(
    node_config: Mapping[str, Any],
    *,
    partitioner: str,
    alpha: float,
    classes_per_node: int,
    eval_fraction: float,
    seed: int,
    dataset_dir: str,
    channels: int,
    size: int,
    split: tuple[int, float] | None = None,
) -> NodeData:
    """A node's training and held-out data, from its node config.

    ``split = (first_new_class, new_node_fraction)`` makes simulated data disjoint
    by category: a fraction of nodes hold only classes >= ``first_new_class``, the
    others only the classes below it (the class-incremental scenario).
    """
    if node_config.get("data-dir"):
        data_dir = str(node_config["data-dir"])
        if not Path(data_dir).is_absolute():
            raise ConfigError(
                f"node config `data-dir` must be absolute, got {data_dir!r}"
            )
        cache = str(node_config.get("cache-dir") or default_cache_dir())
        return _folder_node(data_dir, cache, eval_fraction, seed, channels, size)
    if "partition-id" in node_config and "num-partitions" in node_config:
        return _simulated_node(
            int(node_config["partition-id"]),
            int(node_config["num-partitions"]),
            partitioner,
            alpha,
            classes_per_node,
            eval_fraction,
            seed,
            dataset_dir,
            channels,
            size,
            split,
        )
    raise ConfigError(
        "node config has neither `data-dir` (a real device's image folder) nor "
        "`partition-id`/`num-partitions` (simulation); start the SuperNode with "
        "--node-config \"data-dir='/abs/path'\""
    )


def load_test_set(dataset_dir: str, channels: int, size: int) -> ImageArrays:
    """Fashion-MNIST's test split for the server's centralised evaluation."""
    return _fashion_mnist("test", dataset_dir, channels, size)
