"""A round's finish: centralised evaluation, version, catalog rows, ``on_round``.

The finish needs none of the nodes, and runs as the round's training and
federated evaluation end, before the next round starts (finishing round N while
N+1 trained was measured slower on a shared host and retired): so a round that
trained is always finished before anything later can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from apps.growth import HeadGrowth
from apps.roundbook import RoundBook, RoundReport
from apps.versions import VersionKeeper, server_state
from fedobj.classmap import ClassMap

CentralEvaluation = Callable[[int, ArrayRecord, ClassMap], dict[str, float]]


class RoundEnd:
    """What a round's finish needs, taken as its training and federated
    evaluation end: what the model was then, whatever the loop does next
    (a growth, a rollback, FedAdam's moments moving).

    ``parent`` is the version a rollback made the round start from (None: the
    previous round's), ``replied`` how many replies were aggregated.
    """

    def __init__(
        self,
        report: RoundReport,
        arrays: ArrayRecord,
        growth: HeadGrowth,
        optimizer: Any,
        *,
        parent: Any = None,
        replied: int = 0,
    ) -> None:
        self.report, self.arrays = report, arrays
        self.class_map, self.model_args = growth.class_map, growth.model_args
        self.server_state = server_state(optimizer)
        self.parent, self.replied = parent, replied


class RoundFinisher:
    """Finishes each round of a run and puts its centralised metrics in the
    run's ``Result``.

    Parameters
    ----------
    versions, book
        Register the round's version; write its catalog rows.
    evaluate_fn
        Centralised evaluation ``(round, arrays, class_map) -> metrics``.
    on_round
        Called with each finished :class:`RoundReport` (outputs, logs).
    """

    def __init__(
        self,
        versions: VersionKeeper,
        book: RoundBook,
        evaluate_fn: CentralEvaluation | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.versions = versions
        self.book = book
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round

    def finish(self, end: RoundEnd, result: Result) -> None:
        """Evaluate centrally, register the version, write the rows, report, and
        keep the centralised metrics in ``result``."""
        report = end.report
        if self.evaluate_fn is not None:
            report.central = self.evaluate_fn(
                report.server_round, end.arrays, end.class_map
            )
        report.version = self.versions.register(
            report.server_round,
            end.arrays.to_torch_state_dict(),
            metrics=report.central,
            class_map=end.class_map,
            model_args=end.model_args,
            grew=report.grew_from is not None,
            privacy=report.privacy,
            server_state=end.server_state,
            parent=end.parent,
        )
        self.book.record(report, end.replied)
        if self.on_round is not None:
            self.on_round(report)
        if report.central:
            result.evaluate_metrics_serverapp[report.server_round] = MetricRecord(
                dict(report.central)
            )
