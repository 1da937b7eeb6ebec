"""Deterministic partitioners: which sample indices each simulated node holds.

Every partitioner is a pure function of ``(labels, num_partitions, seed, ...)`` so that
every Ray actor, in any process, computes the same split without talking to the others.
"""

from __future__ import annotations

import numpy as np

from fedobj.errors import ConfigError

PARTITIONERS = ("iid", "dirichlet", "k-classes")


def iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_partitions`` nearly equal parts."""
    _check_n(labels, num_partitions)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(order, num_partitions)]


def dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is spread over nodes by proportions ~ Dir(alpha).

    Small ``alpha`` (0.1-0.5) gives each node a few dominant classes. Draws are repeated
    (deterministically) until every node holds at least ``min_size`` samples, so no
    node is left with nothing to train on; after ``max_tries`` the last draw is used.
    """
    _check_n(labels, num_partitions)
    if alpha <= 0:
        raise ConfigError(f"dirichlet-alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    min_size = min(min_size, len(labels) // num_partitions)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def k_classes(
    labels: np.ndarray, num_partitions: int, k: int, seed: int
) -> list[np.ndarray]:
    """Each node holds exactly ``k`` classes (pathological non-IID, McMahan et al.).

    Classes are dealt round-robin over a shuffled order so every class is held by some
    node when ``num_partitions * k >= num_classes``; a class's samples are split evenly
    among the nodes that hold it.
    """
    _check_n(labels, num_partitions)
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ConfigError(f"classes-per-node must be in 1..{len(classes)}, got {k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    slot = 0
    for node in range(num_partitions):
        for _ in range(k):
            holders[int(order[slot % len(order)])].append(node)
            slot += 1
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for c, nodes in holders.items():
        if not nodes:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for node, chunk in zip(nodes, np.array_split(idx, len(nodes))):
            parts[node].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(
    labels: np.ndarray,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_node: int = 2,
) -> list[np.ndarray]:
    """Dispatch on the run config's ``partitioner`` name."""
    if method == "iid":
        return iid(labels, num_partitions, seed)
    if method == "dirichlet":
        return dirichlet(labels, num_partitions, alpha, seed)
    if method == "k-classes":
        return k_classes(labels, num_partitions, classes_per_node, seed)
    raise ConfigError(f"partitioner must be one of {PARTITIONERS}, got {method!r}")


def train_eval_split(
    n: int, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a node's own samples into a training part and a held-out part."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _check_n(labels: np.ndarray, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ConfigError(f"num-partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ConfigError(
            f"cannot split {len(labels)} samples into {num_partitions} partitions"
        )
