"""How much each reply weighs in a round's mean: examples, or class-balanced.

FedAvg weighs a reply by its example count, so a category held by few nodes (or
added late) barely moves the mean. ``class-balanced`` gives each image the
inverse of its category's share of this run's images instead, so that every
active category moves the mean as much as any other. The counts are this run's
(each node's images of a category counted once, as the round's bookkeeping
reports them), never the catalog's ``sample_count``, which adds up every run ever
made and would weigh a category added late several times the others.

No Flower here: the strategy asks for the round's per-image weights and hands
them to the reply folder (``apps/exchange.py``), which multiplies them into each
reply's label histogram.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection, Mapping

MODES = ("examples", "class-balanced")


class AggregationWeights:
    """This run's images per category and the per-image weights they give.

    Parameters
    ----------
    mode
        ``"examples"``: each reply weighs its example count (FedAvg's rule);
        ``"class-balanced"``: each image weighs the mean of the active
        categories' counts over its own category's count.
    """

    def __init__(self, mode: str = "examples") -> None:
        if mode not in MODES:
            raise ValueError(
                "aggregation_weights must be 'examples' or 'class-balanced', "
                f"got {mode!r}"
            )
        self.mode = mode
        # this run's images per category, each node's counted once; rounds may
        # finish in a worker thread while the next round asks for its weights
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def balanced(self) -> bool:
        return self.mode == "class-balanced"

    def check_strategy(self, streaming: bool, strategy: str) -> None:
        """Refuse class-balanced weights for a ``strategy`` that does not fold
        replies as they arrive: only the reply folder's running mean applies
        them (FedAdam and the DP wrappers aggregate every reply their own way)."""
        if self.balanced and not streaming:
            raise ValueError(
                f"aggregation_weights={self.mode!r} needs a strategy that "
                f"folds replies as they arrive (FedAvg, FedProx, PerfFedAvg), not "
                f"{strategy}"
            )

    def add(self, counts: Mapping[str, int]) -> None:
        """Count images the bookkeeping saw for the first time this run."""
        with self._lock:
            self.counts.update(counts)

    def class_weights(self, active: Collection[str]) -> dict[str, float]:
        """Per-image weights that make the ``active`` categories count the same:
        the mean of their image counts over each one's count.

        A category with no count yet (just added: its images were ignored until
        now) is left out and its images weigh 1, as under example weights; it is
        balanced from the round after its images are counted.
        """
        with self._lock:
            counts = {s: c for s, c in self.counts.items() if s in active and c > 0}
        if not counts:
            return {}
        mean = sum(counts.values()) / len(counts)
        return {slug: mean / count for slug, count in counts.items()}

    def for_round(self, active: Collection[str]) -> dict[str, float] | None:
        """The weights the round's reply folder uses: None for example weights."""
        return self.class_weights(active) if self.balanced else None
