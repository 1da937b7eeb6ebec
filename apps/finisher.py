"""A round's finish: centralised evaluation, version, catalog rows, ``on_round``.

The finish needs none of the nodes. With ``overlap-rounds`` it runs in one worker
thread while the next round trains, so the nodes do not wait for the server's
evaluation; finishes still run one at a time and in round order, the version
rules (parent, current, rollback) are the same as without overlap
(apps/versions.py), and a round that trained is always finished, even when a
later one fails. Worth it when the ServerApp has cores of its own (a deployment):
in a one-machine simulation its evaluation competes with the nodes' training
(measured: no gain on 2 cores), so the run config's ``overlap-rounds`` defaults
to false.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
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
    evaluation end: the next round may grow the head, follow a rollback or
    move FedAdam's moments while this one finishes.

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
    overlap
        Finish round N in a worker thread while round N+1 trains.
    """

    def __init__(
        self,
        versions: VersionKeeper,
        book: RoundBook,
        evaluate_fn: CentralEvaluation | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        overlap: bool = False,
    ) -> None:
        self.versions = versions
        self.book = book
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.overlap = overlap
        self.result = Result()
        self.pool: ThreadPoolExecutor | None = None
        self.pending: tuple[RoundReport, Future[None]] | None = None

    @contextmanager
    def run(self, result: Result) -> Iterator[RoundFinisher]:
        """Finish the rounds submitted inside into ``result``; on the way out,
        wait for the finish still running (and raise its error, if any)."""
        self.result, self.pending = result, None
        self.pool = ThreadPoolExecutor(1, "fedobj-finish") if self.overlap else None
        try:
            yield self
        finally:
            # nothing lost: a round that trained is always finished, even when
            # the next one failed
            if self.pending is not None:
                self._collect(*self.pending)
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def submit(self, end: RoundEnd) -> None:
        """Finish the round now, or (overlap) once the previous finish is done."""
        if self.pending is not None:  # finished while this round trained
            self._collect(*self.pending)
            self.pending = None
        if self.pool is None:
            self.finish(end)
            self._collect(end.report, None)
        else:
            self.pending = (end.report, self.pool.submit(self.finish, end))

    def finish(self, end: RoundEnd) -> None:
        """Evaluate centrally, register the version, write the rows, report."""
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

    def _collect(self, report: RoundReport, done: Future[None] | None) -> None:
        if done is not None:
            done.result()  # the finish's own error, if any, surfaces here
        if report.central:
            self.result.evaluate_metrics_serverapp[report.server_round] = MetricRecord(
                dict(report.central)
            )
