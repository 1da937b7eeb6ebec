"""The head through a run: grown from the catalog, distilled into after growth.

Contract 4 makes growth itself a pure function (``fedobj.model.growth``); what the
round loop must still decide is *when* and *what follows*: the head grows when the
round's catalog snapshot has more classes than the model, FedAdam's moments grow
with it, and for a few rounds after a growth nodes are asked to distil the old
classes. :class:`HeadGrowth` keeps the state those decisions read (the class map
and architecture the model has now, and this run's last growth) so that the
strategy only calls it at the right steps.

It handles Flower's ``ArrayRecord`` because the round's model travels in one; it
needs nothing else from Flower.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from apps.versions import MOMENTS
from fedobj.classmap import ClassMap
from fedobj.errors import FedObjError
from fedobj.model.factory import ModelArgs, head_keys
from fedobj.model.growth import grow_head, grow_rows

# the round's lines, wherever the step that writes them lives
log = logging.getLogger("fedobj.strategy")


class NoActiveCategoryError(FedObjError):
    """The catalog has no active category: there is nothing to train."""


def check_active(class_map: ClassMap) -> None:
    """Refuse a class map with no active category (nothing to train)."""
    if not class_map.active_indices:
        raise NoActiveCategoryError(
            "the catalog has no active category; add one "
            "(`fedobj catalog add NAME`) before starting a run"
        )


def numpy_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays as NumPy, by name."""
    return {k: v.numpy() for k, v in arrays.items()}


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """NumPy arrays back into an ArrayRecord (contiguous, as Flower needs)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def grow_moments(optimizer: Any, heads: tuple[str, ...], new_n: int) -> None:
    """Grow a server optimizer's moments with the head: new rows start at zero.

    ``optimizer`` is the inner Flower strategy; one without moments (FedAvg), or
    whose moments do not exist yet (before its first aggregation), is left alone.
    """
    for name in MOMENTS:
        state = getattr(optimizer, name, None)
        if state:
            setattr(
                optimizer,
                name,
                {
                    k: grow_rows(v, new_n, "zeros") if k in heads else v
                    for k, v in state.items()
                },
            )


class HeadGrowth:
    """What the model's head means now, and what this run's last growth asks for.

    Parameters
    ----------
    model_args
        The architecture; its ``num_classes`` follows the catalog.
    seed
        Seeds the new rows (with the new class count, so a resume draws the same).
    distill_rounds
        After a growth, for this many rounds, nodes distil the old classes from
        the model they receive (``distill-classes``). The window is not kept
        across a resume.
    """

    INIT = "mean"
    """New rows start at the old rows' mean (``fedobj.model.growth``)."""

    def __init__(
        self, model_args: ModelArgs, seed: int = 0, distill_rounds: int = 0
    ) -> None:
        self.model_args = model_args
        self.class_map = ClassMap()
        self.init = self.INIT
        self.seed = seed
        self.distill_rounds = distill_rounds
        self.grown_from: int | None = None  # classes before this run's last growth
        self.grew_at: int | None = None  # the round of that growth

    @property
    def heads(self) -> tuple[str, str]:
        """The head's weight and bias names in the current architecture."""
        return head_keys(self.model_args)

    @property
    def active_slugs(self) -> set[str]:
        """The slugs of the categories the model trains now."""
        return {e.slug for e in self.class_map.entries if e.active}

    def start_from(self, class_map: ClassMap) -> None:
        """The model a run starts with has this map (refused with no active class)."""
        self.class_map = class_map
        check_active(class_map)
        self.model_args = self.model_args.with_classes(class_map.num_classes)

    def follow(self, class_map: ClassMap, model_args: ModelArgs) -> None:
        """A rollback brings back a checkpoint's model: its map and architecture."""
        self.class_map = class_map
        self.model_args = model_args

    def grow(
        self,
        arrays: ArrayRecord,
        snapshot: ClassMap,
        server_round: int,
        optimizer: Any = None,
    ) -> tuple[ArrayRecord, int | None]:
        """Grow the head (and ``optimizer``'s moments) when the catalog has grown.

        The snapshot becomes the model's class map either way (deactivations
        change it without growth); one with no active class is refused. Returns
        the arrays to train and the class count before the growth, or None when
        the head did not grow.
        """
        check_active(snapshot)
        old_n, new_n = self.class_map.num_classes, snapshot.num_classes
        self.class_map = snapshot
        if new_n <= old_n:
            return arrays, None
        heads = self.heads
        grown = grow_head(
            numpy_arrays(arrays), heads, old_n, new_n, self.init, self.seed + new_n
        )
        grow_moments(optimizer, heads, new_n)
        self.model_args = self.model_args.with_classes(new_n)
        log.info(
            "catalog grew from %d to %d classes: head grown (%s init)",
            old_n,
            new_n,
            self.init,
        )
        self.grown_from, self.grew_at = old_n, server_round
        return array_record(grown), old_n

    def within(self, server_round: int, rounds: int) -> bool:
        """Whether ``server_round`` is one of the first ``rounds`` from this
        run's last growth (the distillation window)."""
        return self.grew_at is not None and 0 <= server_round - self.grew_at < rounds

    def distill_classes(self, server_round: int) -> int:
        """How many old classes nodes distil this round (LwF; 0: none).

        Contract 4 keeps the old rows intact, so the model a node receives
        still knows them.
        """
        if self.within(server_round, self.distill_rounds):
            return self.grown_from or 0
        return 0
