"""CatalogStrategy: the outer orchestrator that owns fedobj's round loop.

Flower's ``Strategy.start()`` runs rounds 1..N with no pre-round hook and no round
offset, and its DP wrappers snapshot the arrays before the inner ``configure_train``.
Growing the head from the catalog, honouring a rollback, validating replies before
any wrapper sees them and resuming at round N+1 all need a step *between* Flower's
hooks, so this class writes its own ``start()`` in Flower's shape (same hooks, same
``Result``) and drives an inner Flower strategy (FedAvg, FedProx, FedAdam) for
sampling and aggregation (DESIGN.md, "The round"). Each step is a collaborator's
one job; this module only says when each one runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from apps.exchange import DOWNLINK_BYTES, ReplyFolder, collect_replies, fold_replies
from apps.exchange import NodeOutcome as NodeResult
from apps.finisher import CentralEvaluation, RoundEnd, RoundFinisher
from apps.growth import HeadGrowth, NoActiveCategoryError
from apps.head_calibration import HeadCalibrator
from apps.inner import make_inner_strategy, streams
from apps.instructions import RoundInstructions
from apps.link import Link
from apps.link_records import message_bytes
from apps.privacy_log import CentralDpError, central_spend, log_node_spend, refuse
from apps.replies import weighs_examples
from apps.roundbook import RoundBook, RoundReport, last_train_seconds
from apps.versions import VersionKeeper
from fedobj import keys
from fedobj.calibration import CalibrationSettings
from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import VersionRecord
from fedobj.classmap import ClassMap
from fedobj.model.factory import ModelArgs
from fedobj.registry import ArtifactStore

__all__ = [  # the loop's public names, wherever their code lives now
    "CatalogStrategy",
    "CentralDpError",
    "NoActiveCategoryError",
    "NodeResult",
    "RoundReport",
    "last_train_seconds",
    "make_inner_strategy",
]

log = logging.getLogger("fedobj.strategy")


class _Run(NamedTuple):
    """What every round of one ``start()`` shares (Flower's loop passes them on)."""

    grid: Grid
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord


class CatalogStrategy(Strategy):
    """Runs rounds from the catalog: snapshot, rollback, growth, validation, versions.

    ``inner`` is the Flower strategy that samples nodes and aggregates; it only
    ever sees validated replies. The other arguments configure a collaborator
    each, where they are documented: :class:`VersionKeeper` (``catalog``,
    ``store``, ``run_id``, ``promote``, ``provenance``), :class:`HeadGrowth`
    (``model_args``, ``seed``, ``distill_rounds``), :class:`RoundInstructions`
    (``lr_fn``, ``central_dp``), :class:`HeadCalibrator` (``calibration``),
    :class:`RoundFinisher` (``evaluate_fn``, ``on_round``) and
    :func:`apps.exchange.dispatch_plan` (``dispatch_stagger``) and
    :class:`apps.link.Link` (``link``: compressed updates, int8 downlink). With
    ``evaluate_on_arrival`` the nodes score the model they receive inside the
    train exchange, and there is no evaluate exchange. With fewer than
    ``min_replies`` valid replies a round leaves the model unchanged.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        catalog: SyncCatalog,
        store: ArtifactStore,
        model_args: ModelArgs,
        run_id: str,
        lr_fn: Callable[[int], float],
        promote: str = "latest",
        min_replies: int = 1,
        evaluate_fn: CentralEvaluation | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        provenance: dict[str, Any] | None = None,
        seed: int = 0,
        distill_rounds: int = 0,
        central_dp: str = "none",
        calibration: CalibrationSettings | None = None,
        dispatch_stagger: float = 0.0,
        link: Link | None = None,
        evaluate_on_arrival: bool = False,
    ) -> None:
        self.versions = VersionKeeper(catalog, store, run_id, promote, provenance)
        self.inner, self.streams = inner, streams(inner)
        # a DP wrapper keeps the strategy it wraps (FedAdam's moments live there)
        self.base: Strategy = getattr(inner, "strategy", inner)
        self.growth = HeadGrowth(model_args, seed, distill_rounds)
        self.instructions = RoundInstructions(
            self.growth, lr_fn, central_dp, calibration, evaluate_on_arrival
        )
        self.calibrator = HeadCalibrator(calibration, seed) if calibration else None
        self.book = RoundBook(catalog, run_id)
        self.finisher = RoundFinisher(self.versions, self.book, evaluate_fn, on_round)
        self.catalog, self.run_id, self.min_replies = catalog, run_id, min_replies
        self.central_dp, self.dispatch_stagger = central_dp, dispatch_stagger
        self.link = link if link is not None else Link("none", 0.0, "none")
        # what the collaborators keep, where callers and tests look for it
        self.reports = self.book.reports
        self.last_train_seconds = self.book.last_train_seconds

    @property
    def class_map(self) -> ClassMap:
        return self.growth.class_map

    def restore_server_state(self, version: VersionRecord) -> None:
        """Give the inner strategy the optimizer moments ``version`` saved."""
        self.versions.restore_server_state(self.base, version)

    # ------------------------------------------------------------ Flower's hooks

    def summary(self) -> None:
        log.info(
            "CatalogStrategy around %s: promote %s",
            type(self.inner).__name__,
            self.versions.promote,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = self.instructions.train(server_round, config)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = self.instructions.evaluate(config)
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        if self.central_dp != "none":
            # the equal weights are for the private mean of the updates; held-out
            # metrics still count every example (and carry no unit weight)
            return aggregate_metricrecords(
                [m.content for m in replies], keys.NUM_EXAMPLES
            )
        return self.inner.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------ the loop

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        class_map: ClassMap | None = None,
        first_round: int = 1,
        parent_version: Any = None,
        lr_phase_start: int | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds starting at ``first_round`` (resume continues).

        ``class_map`` is what ``initial_arrays``' head means (default: the catalog's
        snapshot now); ``parent_version`` the version they came from, if any;
        ``lr_phase_start`` the round the learning-rate schedule counts from
        (default ``first_round``: a run extending a finished one starts its
        schedule over; one continuing an interrupted run keeps that run's).
        Centralised evaluation is the constructor's ``evaluate_fn`` (it gets the
        class map too); this one is only Flower's signature.
        """
        del evaluate_fn
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.growth.start_from(class_map or self.catalog.snapshot())
        self.instructions.lr_phase_start = lr_phase_start or first_round
        self.versions.begin(parent_version)
        result = Result()
        arrays = initial_arrays
        run = _Run(grid, timeout, train_config, evaluate_config)
        t_start = time.time()
        for server_round in range(first_round, first_round + num_rounds):
            try:
                arrays, end = self._round(run, server_round, arrays)
            except PrivacyBudgetExhausted as exc:
                # the budget is a stop, not a failure: every version so far stands
                log.warning(
                    "central DP budget reached: round %d not run, stopping (%s)",
                    server_round,
                    exc,
                )
                break
            result.arrays = arrays
            self.finisher.finish(end, result)
        log.info("%d rounds in %.1f s", num_rounds, time.time() - t_start)
        return result

    def _round(
        self, run: _Run, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, RoundEnd]:
        """Train and federatedly evaluate one round; return the new arrays and
        what the round's finish needs (centralised evaluation, version, rows)."""
        started = time.time()
        rolled_back = parent = None  # unless an admin made another version current
        followed = self.versions.follow_rollback(self.base)
        if followed is not None:
            version, ckpt = followed
            self.growth.follow(ckpt.class_map, ckpt.model_args)
            arrays = ArrayRecord(ckpt.state_dict)
            rolled_back, parent = version.name, version.id
        snapshot = self.catalog.snapshot()  # once per round (contract 3)
        arrays, grew_from = self.growth.grow(arrays, snapshot, server_round, self.base)
        lr = self.instructions.lr_at(server_round)
        report = RoundReport(server_round, started, lr, self.class_map)
        report.grew_from, report.rolled_back_to = grew_from, rolled_back
        self.book.open(report)
        arrays, replied = self._train(
            run.grid, server_round, arrays, run.timeout, run.train_config, report
        )
        arrays = self._evaluate(run, arrays, report)
        end = RoundEnd(
            report, arrays, self.growth, self.base, parent=parent, replied=replied
        )
        return arrays, end

    def _train(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        timeout: float,
        config: ConfigRecord,
        report: RoundReport,
    ) -> tuple[ArrayRecord, int]:
        """The round's training exchange: the new arrays and how many replies
        were aggregated (``apps/secagg.py`` replaces it with SecAgg+)."""
        try:
            messages = list(self.configure_train(server_round, arrays, config, grid))
        except ValueError as exc:  # Flower's accountant: the sample size changed
            refuse(server_round, self.central_dp, exc)
            raise
        self.book.start(report, len(messages))
        messages = self.link.outgoing(messages, arrays, f"r{server_round}t")
        sizes = _message_sizes(messages)
        alpha = getattr(self.base, "perf_alpha", None)  # PerfFedAvg's
        folder = ReplyFolder(
            arrays, stream=self.streams, perf_alpha=alpha, link=self.link
        )
        last, stagger = self.last_train_seconds, self.dispatch_stagger
        fold_replies(
            grid, messages, timeout, folder, last_seconds=last, stagger=stagger
        )
        del messages
        for outcome in folder.outcomes:
            if outcome.node_id in sizes:
                outcome.metrics[DOWNLINK_BYTES] = float(sizes[outcome.node_id])
        self.book.trained(report, folder.outcomes, folder.rejected)
        log_node_spend(server_round, report.train)
        if folder.valid_count >= self.min_replies:
            # the folder's streamed mean, or the inner strategy's own of every reply
            aggregated, _ = folder.aggregate(
                partial(self.aggregate_train, server_round)
            )
            if aggregated is not None:
                arrays = aggregated
        else:
            log.warning(
                "round %d: %d valid replies (< %d): the model is unchanged",
                server_round,
                folder.valid_count,
                self.min_replies,
            )
        report.privacy = central_spend(server_round, self.inner, self.central_dp)
        return arrays, folder.valid_count

    def _evaluate(
        self, run: _Run, arrays: ArrayRecord, report: RoundReport
    ) -> ArrayRecord:
        """Federated evaluation of the round's model; returns it calibrated on the
        nodes' feature statistics when calibration is on."""
        server_round = report.server_round
        if self.instructions.evaluate_first:
            self.book.evaluated(report, arrival_outcomes(report.train))
            return arrays
        messages = list(
            self.configure_evaluate(server_round, arrays, run.evaluate_config, run.grid)
        )
        if not messages:
            return arrays
        messages = self.link.outgoing(messages, arrays, f"r{server_round}e")
        replies, outcomes = collect_replies(run.grid, messages, run.timeout)
        for reply in replies:
            self.link.note(reply)
        self.book.evaluated(report, outcomes)
        ok = [m for m in replies if weighs_examples(m)]
        calibrator, heads = self.calibrator, self.growth.heads
        stats = calibrator.feature_stats(replies, arrays, heads) if calibrator else None
        if ok:
            self.aggregate_evaluate(server_round, ok)
        if calibrator is not None and stats is not None:
            active = self.class_map.active_indices
            arrays = calibrator.calibrate(server_round, arrays, stats, heads, active)
        return arrays


def arrival_outcomes(train: list[NodeResult]) -> list[NodeResult]:
    """The federated evaluation that came in the train replies
    (``evaluate-on-arrival``): each node's score of the model it received, as
    an evaluate outcome (its held-out count as the example count)."""
    out = []
    for o in train:
        if o.failure is not None or keys.EVAL_EXAMPLES not in o.metrics:
            continue
        metrics = {
            keys.NUM_EXAMPLES: o.metrics[keys.EVAL_EXAMPLES],
            keys.EVAL_LOSS: o.metrics.get(keys.EVAL_LOSS, 0.0),
            keys.EVAL_ACCURACY: o.metrics.get(keys.EVAL_ACCURACY, 0.0),
        }
        out.append(NodeResult(o.node_id, metrics))
    return out


def _message_sizes(messages: list[Message]) -> dict[int, int]:
    """Each destination's message size as Flower counts it (messages often
    share one content: counted once)."""
    counted: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for m in messages:
        key = id(m.content)
        if key not in counted:
            counted[key] = message_bytes(m.content)
        sizes[m.metadata.dst_node_id] = counted[key]
    return sizes
