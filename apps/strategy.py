"""CatalogStrategy: the outer orchestrator that owns fedobj's round loop.

Flower's ``Strategy.start()`` runs rounds 1..N with no pre-round hook and no round
offset, and its DP wrappers snapshot the arrays before the inner ``configure_train``.
Growing the head from the catalog, honouring a rollback, validating replies before
any wrapper sees them and resuming at round N+1 all need a step *between* Flower's
hooks, so this class writes its own ``start()`` in Flower's shape (same hooks, same
``Result``) and drives an inner Flower strategy (FedAvg, FedProx, FedAdam) for
sampling and aggregation (DESIGN.md, "The round").
"""

from __future__ import annotations

import functools
import io
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from apps.central_dp import PROVENANCE_KEY, spend, wrap_central_dp
from apps.exchange import NodeOutcome as NodeResult
from apps.exchange import (
    ReplyFolder,
    count_of,
    dispatch_plan,
    exchange,
    histogram_problem,
    missing,
    outcome_of,
    reply_order,
)
from apps.perffedavg import PerfFedAvg
from apps.records import put_model_context
from fedobj import keys
from fedobj.aggregation import array_view
from fedobj.calibration import CalibrationSettings, StatsSum, calibrate_head
from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import VersionRecord
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.errors import FedObjError
from fedobj.model.checkpoint import Checkpoint
from fedobj.model.factory import ModelArgs, head_keys
from fedobj.model.growth import (
    align_new_biases,
    align_new_rows,
    grow_head,
    grow_rows,
)
from fedobj.registry import ArtifactStore

log = logging.getLogger("fedobj.strategy")

REPORTS_KEPT = 5
"""Recent round reports kept for inspection; older ones (per-node results) go."""


class NoActiveCategoryError(FedObjError):
    """The catalog has no active category: there is nothing to train."""


class CentralDpError(FedObjError):
    """Central DP cannot go on as configured (e.g. the sampled population changed)."""


@dataclass
class RoundReport:
    """What happened in one round, for outputs, logs and the catalog."""

    server_round: int
    started: float
    lr: float
    class_map: ClassMap
    sampled: int = 0
    train: list[NodeResult] = field(default_factory=list)
    rejected: list[NodeResult] = field(default_factory=list)
    evaluate: list[NodeResult] = field(default_factory=list)
    grew_from: int | None = None
    rolled_back_to: str | None = None
    version: VersionRecord | None = None
    central: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # central DP: spend so far and its ledger
    # seconds the round held the loop (training and federated evaluation); with
    # overlapping rounds its evaluation and version follow while the next trains
    critical_s: float | None = None


def make_inner_strategy(
    cfg: RunConfig, num_nodes: int | None = None, ledger: dict[str, Any] | None = None
) -> Strategy:
    """Flower's strategy named by ``strategy`` in the run config.

    With ``central-dp`` it is wrapped in Flower's DP wrapper (apps/central_dp.py),
    which needs the number of connected nodes and continues ``ledger``, the
    accountant state an earlier run recorded.
    """
    base = _base_strategy(cfg)
    if cfg.central_dp == "none":
        return base
    if num_nodes is None:
        raise ValueError("central DP needs the number of connected nodes")
    return wrap_central_dp(base, cfg, num_nodes, ledger)


def _base_strategy(cfg: RunConfig) -> FedAvg:
    # central DP's noise assumes an equal-weight mean (apps/central_dp.py)
    weight = keys.UNIT_WEIGHT if cfg.central_dp != "none" else keys.NUM_EXAMPLES
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=min(cfg.min_nodes, 2),
        min_available_nodes=cfg.min_nodes,
        weighted_by_key=weight,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )
    if cfg.strategy == "fedavg":
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if cfg.strategy == "perffedavg":
        return PerfFedAvg(**common, perf_alpha=cfg.perf_alpha)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")  # RunConfig rejects it first


def _num_examples(msg: Message) -> float:
    metrics = msg.content.metric_records.get(keys.METRICS)
    value = metrics.get(keys.NUM_EXAMPLES) if metrics is not None else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def last_train_seconds(outcomes: list[NodeResult]) -> dict[int, float]:
    """Each replying node's training time (0 for a node with nothing to train).

    Only this round's replies: bounded by the round's sample, nothing kept per
    node across the run. Non-finite or negative times are left out (unknown).
    """
    out: dict[int, float] = {}
    for o in outcomes:
        if o.failure is not None:
            continue
        value = o.metrics.get(keys.TRAIN_SECONDS)
        if value is None and o.metrics.get(keys.NUM_EXAMPLES) == 0:
            value = 0.0
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            out[o.node_id] = float(value)
    return out


class CatalogStrategy(Strategy):
    """Runs rounds from the catalog: snapshot, rollback, growth, validation, versions.

    Parameters
    ----------
    inner
        The Flower strategy that samples nodes and aggregates (FedAvg, FedProx,
        FedAdam); it only ever sees validated replies.
    catalog, store
        Where categories, rounds and versions live, and where checkpoints go.
    model_args
        The architecture; its ``num_classes`` follows the catalog.
    lr_fn
        Learning rate nodes use in a round (the schedule across rounds).
    head_init
        How new head rows start (``fedobj.model.growth``).
    head_align
        ``"norm"``: after every aggregation following a growth in this run, scale
        the new classes' weight rows to the old rows' mean norm (weight aligning);
        ``"norm-bias"``: also shift their biases to the old biases' mean.
    promote
        ``"latest"``: every round's version becomes current; ``"best"``: only one
        with the best centralised accuracy among versions of the same class map
        (a growth always makes its first version current).
    evaluate_fn
        Centralised evaluation ``(round, arrays, class_map) -> metrics``.
    on_round
        Called with each finished :class:`RoundReport` (outputs, logs).
    lr_restart_on_growth
        Restart the learning-rate schedule at the round the head grows (new rows
        start where old ones did, not at a nearly spent rate).
    head_warmup_rounds
        After a growth, for this many rounds, train messages ask nodes to train
        the head only (``head-only``), and the round's model keeps every other
        array as sent (FedAdam's moments, central-DP noise or SecAgg+ rounding
        would move them). Not kept across a resume (like ``distill_rounds``).
    distill_rounds
        After a growth, for this many rounds, train messages ask nodes to distil
        the old classes from the model they receive (``distill-classes``).
    central_dp
        The ``central-dp`` mode ``inner`` is wrapped for; train messages carry it
        so nodes weigh their replies equally and clip where the mode says.
    aggregation_weights
        ``"examples"``: each reply weighs its example count (FedAvg's rule);
        ``"class-balanced"``: each image weighs the inverse of its category's
        share of the images this run's nodes have reported (their label
        histograms, each node's images of a category counted once), so that
        every category moves the mean as much as any other however few nodes
        hold it (streaming strategies only; see :meth:`class_weights`).
    dispatch_stagger
        Push train messages longest-first (by each node's last training time),
        this many seconds apart, so that a Ray simulation's workers take them in
        that order (:func:`apps.exchange.dispatch_plan`); 0 pushes all at once.
    overlap
        Finish round N (centralised evaluation, checkpoint, version, catalog rows,
        ``on_round``) in a worker thread while round N+1 trains: the nodes do not
        wait for the server's evaluation. Finishes still run one at a time and in
        order, and the version rules (parent, current, rollback) are the same as
        without overlap (see :meth:`_register`). Worth it when the ServerApp has
        cores of its own (a deployment); in a one-machine simulation its
        evaluation competes with the nodes' training (measured: no gain on 2
        cores), so the run config's ``overlap-rounds`` defaults to false.
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
        head_init: str = "mean",
        head_align: str = "none",
        promote: str = "latest",
        min_replies: int = 1,
        evaluate_fn: Callable[[int, ArrayRecord, ClassMap], dict[str, float]]
        | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        provenance: dict[str, Any] | None = None,
        seed: int = 0,
        distill_rounds: int = 0,
        lr_restart_on_growth: bool = False,
        central_dp: str = "none",
        overlap: bool = False,
        calibration: CalibrationSettings | None = None,
        dispatch_stagger: float = 0.0,
        aggregation_weights: str = "examples",
        head_warmup_rounds: int = 0,
    ) -> None:
        if promote not in ("latest", "best"):
            raise ValueError(f"promote must be 'latest' or 'best', got {promote!r}")
        if aggregation_weights not in ("examples", "class-balanced"):
            raise ValueError(
                "aggregation_weights must be 'examples' or 'class-balanced', "
                f"got {aggregation_weights!r}"
            )
        self.inner = inner
        # a DP wrapper keeps the strategy it wraps (FedAdam's moments live there)
        self.base: Strategy = getattr(inner, "strategy", inner)
        self.central_dp = central_dp
        # FedAvg, FedProx and PerfFedAvg aggregate as replies arrive; FedAdam
        # (and any wrapper) needs every reply together (apps/exchange.py)
        self.streams = type(inner) in (FedAvg, FedProx, PerfFedAvg)
        if aggregation_weights != "examples" and not self.streams:
            raise ValueError(
                f"aggregation_weights={aggregation_weights!r} needs a strategy that "
                f"folds replies as they arrive (FedAvg, FedProx, PerfFedAvg), not "
                f"{type(inner).__name__}"
            )
        self.aggregation_weights = aggregation_weights
        self.catalog = catalog
        self.store = store
        self.model_args = model_args
        self.run_id = run_id
        self.lr_fn = lr_fn
        self.head_init = head_init
        self.head_align = head_align
        self.grown_from: int | None = None  # classes before this run's last growth
        self.grew_at: int | None = None  # the round of that growth
        self.promote = promote
        self.min_replies = min_replies
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.provenance = dict(provenance or {})
        self.seed = seed
        self.class_map = ClassMap()
        self.overlap = overlap
        self.reports: dict[int, RoundReport] = {}
        # per node, the category slugs whose images it has already added to the
        # catalog's sample counts this run (bounded by nodes x categories)
        self.counted_labels: dict[int, set[str]] = {}
        # this run's images per category, each node's counted once (the
        # class-balanced weights; rounds may finish in a worker thread)
        self.run_label_counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        # the version the last finished round registered (parent of the next one
        # unless a rollback intervenes), the version this run believes is current
        # (a difference is an admin's move), and the last round that started from
        # a rolled-back version (older rounds finishing later never become current);
        # the lock makes "read current, register, update" atomic against the check
        # at the start of a round
        self.last_version_id: Any = None
        self.expected_current: Any = None
        self.rollback_round = 0
        self._versions_lock = threading.Lock()
        self.distill_rounds = distill_rounds
        self.lr_restart_on_growth = lr_restart_on_growth
        self.lr_phase_start = 1
        self.head_warmup_rounds = head_warmup_rounds
        self.calibration = calibration
        self.dispatch_stagger = dispatch_stagger
        # each node's training seconds in the last round (its replies only, so
        # bounded by a round's sample): the order of the next round's pushes
        self.last_train_seconds: dict[int, float] = {}

    # ------------------------------------------------------------ Flower's hooks

    def summary(self) -> None:
        log.info(
            "CatalogStrategy around %s: head-init %s, promote %s",
            type(self.inner).__name__,
            self.head_init,
            self.promote,
        )
        self.inner.summary()

    def lr_at(self, server_round: int) -> float:
        """The round's learning rate; the schedule restarts at a growth if asked."""
        return self.lr_fn(server_round - self.lr_phase_start + 1)

    def _context(self, config: ConfigRecord) -> ConfigRecord:
        config = ConfigRecord(
            dict(config)
        )  # messages of a round never share later edits
        put_model_context(config, self.model_args, self.class_map)
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord(dict(config))  # this round's own copy
        config[keys.LR] = self.lr_at(server_round)
        # LwF: for the rounds after a growth nodes keep the old classes' outputs
        # close to the model they receive (contract 4 keeps those rows intact)
        config[keys.DISTILL_CLASSES] = (
            self.grown_from or 0
            if self._after_growth(server_round, self.distill_rounds)
            else 0
        )
        if self.central_dp != "none":
            config[keys.CENTRAL_DP] = self.central_dp
        if self._after_growth(server_round, self.head_warmup_rounds):
            # LP-FT (Kumar et al., ICLR 2022): fine-tuning under untrained rows
            # sends their large errors into the extractor and distorts the
            # features the old rows read; nodes first fit the head alone
            config[keys.HEAD_ONLY] = True
        elif self.calibration is not None and self.calibration.freeze_head:
            config[keys.FREEZE_HEAD] = True  # the server's calibration sets it
        return self.inner.configure_train(
            server_round, arrays, self._context(config), grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.calibration is not None:
            config = ConfigRecord(dict(config))
            config[keys.FEATURE_STATS] = True
        return self.inner.configure_evaluate(
            server_round, arrays, self._context(config), grid
        )

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
        ``evaluate_fn`` is accepted for signature compatibility; centralised
        evaluation is the constructor's ``evaluate_fn``, which also gets the map.
        """
        del evaluate_fn
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        self.class_map = class_map or self.catalog.snapshot()
        self._check_active(self.class_map)
        self.model_args = self.model_args.with_classes(self.class_map.num_classes)
        self.last_version_id = parent_version
        self.lr_phase_start = lr_phase_start or first_round
        if parent_version is not None:  # continuing from it: follow a different current
            self.expected_current = parent_version
        else:  # a fresh model does not "roll back" to what an older run left current
            current = self.catalog.current_version()
            self.expected_current = current.id if current is not None else None
        self.rollback_round = 0
        result = Result()
        arrays = initial_arrays
        t_start = time.time()
        pool = ThreadPoolExecutor(1, "fedobj-finish") if self.overlap else None
        pending: tuple[RoundReport, Future[None]] | None = None

        def collect(report: RoundReport, done: Future[None] | None) -> None:
            if done is not None:
                done.result()  # the finish's own error, if any, surfaces here
            if report.central:
                result.evaluate_metrics_serverapp[report.server_round] = MetricRecord(
                    dict(report.central)
                )

        try:
            for server_round in range(first_round, first_round + num_rounds):
                try:
                    arrays, report, finish = self._round(
                        grid,
                        server_round,
                        arrays,
                        timeout,
                        train_config,
                        evaluate_config,
                    )
                except PrivacyBudgetExhausted as exc:
                    # the budget is a stop, not a failure: every version so far stands
                    log.warning(
                        "central DP budget reached: round %d not run, stopping (%s)",
                        server_round,
                        exc,
                    )
                    break
                result.arrays = arrays
                if pending is not None:  # finished while this round trained
                    collect(*pending)
                    pending = None
                if pool is None:
                    finish()
                    collect(report, None)
                else:
                    pending = (report, pool.submit(finish))
        finally:
            # nothing lost: a round that trained is always finished, even when
            # the next one failed
            if pending is not None:
                collect(*pending)
            if pool is not None:
                pool.shutdown(wait=True)
        log.info("%d rounds in %.1f s", num_rounds, time.time() - t_start)
        return result

    def _check_active(self, class_map: ClassMap) -> None:
        if not class_map.active_indices:
            raise NoActiveCategoryError(
                "the catalog has no active category; add one "
                "(`fedobj catalog add NAME`) before starting a run"
            )

    def _round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> tuple[ArrayRecord, RoundReport, Callable[[], None]]:
        """Train and federatedly evaluate one round; return the new arrays, the
        report and the round's finish (centralised evaluation, version, rows)."""
        started = time.time()
        arrays, rolled_back, parent = self._follow_rollback(arrays, server_round)
        snapshot = self.catalog.snapshot()  # once per round (contract 3)
        self._check_active(snapshot)
        arrays, grew_from = self._grow(arrays, snapshot)
        if grew_from is not None:
            self.grown_from, self.grew_at = grew_from, server_round
        if grew_from is not None and self.lr_restart_on_growth:
            self.lr_phase_start = server_round  # new rows learn at the full rate
        report = RoundReport(
            server_round,
            started,
            self.lr_at(server_round),
            self.class_map,
            grew_from=grew_from,
            rolled_back_to=rolled_back,
        )
        self.reports[server_round] = report
        while len(self.reports) > REPORTS_KEPT:  # memory must not grow with rounds
            del self.reports[min(self.reports)]

        sent = arrays
        arrays, valid_count = self._train(
            grid, server_round, arrays, timeout, train_config, report
        )
        if self._after_growth(server_round, self.head_warmup_rounds):
            arrays = self._keep_extractor(sent, arrays)

        eval_msgs = list(
            self.configure_evaluate(server_round, arrays, evaluate_config, grid)
        )
        if eval_msgs:
            eval_replies: list[Message] = []
            silent: list[int] = []  # nodes that did not answer in time
            exchange(
                grid, eval_msgs, timeout, eval_replies.append, on_missing=silent.append
            )
            eval_replies.sort(key=reply_order)  # summed: a canonical order
            report.evaluate = [outcome_of(m) for m in eval_replies]
            report.evaluate += [missing(n, timeout) for n in silent]
            for bad in report.evaluate:
                if bad.error is not None:
                    log.warning(
                        "round %d: evaluate reply from node %d rejected: %s",
                        server_round,
                        bad.node_id,
                        bad.error,
                    )
            ok = [
                m for m in eval_replies if not m.has_error() and _num_examples(m) > 0
            ]  # Flower divides by the summed weights
            stats = self._feature_stats(eval_replies, arrays)
            if ok:
                self.aggregate_evaluate(server_round, ok)
            if stats is not None:
                arrays = self._calibrate(server_round, arrays, stats)
        # what the finish needs, taken now: the next round may grow the head,
        # follow a rollback or move FedAdam's moments while this one finishes
        class_map, model_args = self.class_map, self.model_args
        server_state = self._server_state()
        if self.overlap:
            report.critical_s = time.time() - started

        def finish() -> None:
            if self.evaluate_fn is not None:
                report.central = self.evaluate_fn(server_round, arrays, class_map)
            report.version = self._register(
                server_round,
                arrays,
                report,
                class_map=class_map,
                model_args=model_args,
                server_state=server_state,
                parent=parent,
            )
            self._record(report, valid_count)
            if self.on_round is not None:
                self.on_round(report)

        return arrays, report, finish

    def _train(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        timeout: float,
        train_config: ConfigRecord,
        report: RoundReport,
    ) -> tuple[ArrayRecord, int]:
        """The round's training exchange: the new arrays and how many replies
        were aggregated (``apps/secagg.py`` replaces it with SecAgg+)."""
        try:
            messages = list(
                self.configure_train(server_round, arrays, train_config, grid)
            )
        except ValueError as exc:  # Flower's accountant: the sample size changed
            if self.central_dp == "none":
                raise
            raise CentralDpError(
                f"round {server_round}: central DP accounting cannot go on: {exc}"
            ) from None
        report.sampled = len(messages)
        self.catalog.start_round(self.run_id, server_round, len(messages))
        folder = ReplyFolder(
            arrays,
            stream=self.streams,
            perf_alpha=getattr(self.base, "perf_alpha", None),
            class_weights=(
                self.class_weights()
                if self.aggregation_weights == "class-balanced"
                else None
            ),
        )
        messages, stagger = dispatch_plan(
            messages, self.last_train_seconds, self.dispatch_stagger
        )
        exchange(
            grid,
            messages,
            timeout,
            folder,
            on_missing=functools.partial(folder.missed, timeout=timeout),
            stagger=stagger,
        )
        del messages
        folder.finish()  # values are checked as they are folded: before counting
        report.train, report.rejected = folder.outcomes, folder.rejected
        self.last_train_seconds = last_train_seconds(folder.outcomes)
        for bad in report.rejected:
            log.warning(
                "round %d: reply from node %d rejected: %s",
                server_round,
                bad.node_id,
                bad.error,
            )
        for o in report.train:  # DP: the spend, and what it is computed from
            if keys.DP_EPSILON in o.metrics:
                m = o.metrics
                log.info(
                    "round %d: node %d DP epsilon %.4f (delta %g; rdp accountant, "
                    "noise multiplier %g, sample rate %.5f, %d steps this round)",
                    server_round,
                    o.node_id,
                    m[keys.DP_EPSILON],
                    m.get(keys.DP_DELTA, float("nan")),
                    m.get(keys.DP_NOISE_MULTIPLIER, float("nan")),
                    m.get(keys.DP_SAMPLE_RATE, float("nan")),
                    int(m.get(keys.DP_STEPS, 0)),
                )
        if folder.valid_count >= self.min_replies:
            aggregated, _ = (
                folder.aggregate()
                if folder.stream
                else self.aggregate_train(server_round, folder.valid)
            )
            if aggregated is not None:
                arrays = self._align(aggregated)
        else:
            log.warning(
                "round %d: %d valid replies (< %d): the model is unchanged",
                server_round,
                folder.valid_count,
                self.min_replies,
            )
        valid_count = folder.valid_count
        self._log_privacy(server_round, report)
        del folder
        return arrays, valid_count

    # ------------------------------------------------------------ steps

    def _after_growth(self, server_round: int, rounds: int) -> bool:
        """Whether ``server_round`` is one of the first ``rounds`` from this
        run's last growth (the distillation and warm-up windows)."""
        return self.grew_at is not None and 0 <= server_round - self.grew_at < rounds

    def _keep_extractor(self, sent: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """A warm-up round's model: the aggregate's head on the extractor as sent.

        Nodes trained the head only, but the aggregate's other arrays may still
        have moved: FedAdam's moments, central-DP noise and SecAgg+ quantisation
        act on every array. Taking them back as sent is independent of the
        nodes' data, so it costs no privacy.
        """
        heads = set(head_keys(self.model_args))
        return ArrayRecord(
            {k: aggregate[k] if k in heads else sent[k] for k in aggregate}
        )

    def _log_privacy(self, server_round: int, report: RoundReport) -> None:
        """Central DP: the spend (fixed clipping) or the clipping bound (adaptive)."""
        if self.central_dp == "none":
            return
        report.privacy = spend(self.inner)
        if report.privacy is not None:
            p = report.privacy
            log.info(
                "round %d: central DP epsilon %.4f at delta %g after %d releases "
                "(%s accountant, noise multiplier %g, clipping norm %g, %d nodes "
                "sampled, no amplification by sampling)",
                server_round,
                p["epsilon"],
                p["delta"],
                p["releases"],
                p["accountant"],
                p["noise_multiplier"],
                p["clipping_norm"],
                p["sampled_nodes"],
            )
        else:
            log.info(
                "round %d: central DP (%s) %s %.4f, noise multiplier "
                "%g; no accountant (central-dp-epsilon=0)",
                server_round,
                self.central_dp,
                "clipping norm now"
                if self.central_dp.endswith("adaptive")
                else "clipping norm",
                float(getattr(self.inner, "clipping_norm", float("nan"))),
                float(getattr(self.inner, "noise_multiplier", float("nan"))),
            )

    def _follow_rollback(
        self, arrays: ArrayRecord, server_round: int
    ) -> tuple[ArrayRecord, str | None, Any]:
        """If an admin made another version current, continue from it.

        Returns the arrays to train, the rolled-back version's name and the
        round's parent when it is not simply the previous round's version.
        """
        with self._versions_lock:
            current = self.catalog.current_version()
            if current is None or current.id == self.expected_current:
                return arrays, None, None
            self.expected_current = current.id
            self.rollback_round = server_round
        ckpt = self.store.load_checkpoint(
            current.checkpoint_uri, current.checkpoint_sha256
        )
        self.class_map = ckpt.class_map
        self.model_args = ckpt.model_args
        self.restore_server_state(current)
        log.info(
            "rollback honoured: continuing from version %s (run %s, round %d)",
            current.name,
            current.run_id,
            current.round,
        )
        return ArrayRecord(ckpt.state_dict), current.name, current.id

    def _grow(
        self, arrays: ArrayRecord, snapshot: ClassMap
    ) -> tuple[ArrayRecord, int | None]:
        """Grow the head (and server optimizer state) when the catalog has grown."""
        old_n, new_n = self.class_map.num_classes, snapshot.num_classes
        self.class_map = snapshot
        if new_n <= old_n:
            return arrays, None
        heads = head_keys(self.model_args)
        grown = grow_head(
            _numpy(arrays), heads, old_n, new_n, self.head_init, self.seed + new_n
        )
        for name in ("m_t", "v_t"):  # FedAdam's moments grow with zeros
            state = getattr(self.base, name, None)
            if state:
                setattr(
                    self.base,
                    name,
                    {
                        k: grow_rows(v, new_n, "zeros") if k in heads else v
                        for k, v in state.items()
                    },
                )
        self.model_args = self.model_args.with_classes(new_n)
        log.info(
            "catalog grew from %d to %d classes: head grown (%s init)",
            old_n,
            new_n,
            self.head_init,
        )
        return _record(grown), old_n

    def _align(self, arrays: ArrayRecord) -> ArrayRecord:
        """Weight aligning of the rows added by this run's last growth, if asked.

        Safe with FedAdam: its ``configure_train`` copies the arrays it is sent,
        so its next step starts from the aligned head.
        """
        if self.head_align == "none" or self.grown_from is None:
            return arrays
        weight_key, bias_key = head_keys(self.model_args)
        numpy = _numpy(arrays)
        active = self.class_map.active_indices
        old = [k for k in active if k < self.grown_from]
        new = [k for k in active if k >= self.grown_from]
        numpy[weight_key], gamma = align_new_rows(numpy[weight_key], old, new)
        shift = 0.0
        if self.head_align == "norm-bias":
            numpy[bias_key], shift = align_new_biases(numpy[bias_key], old, new)
        log.info("head aligned: new rows scaled by %.3f, biases %+.3f", gamma, shift)
        return _record(numpy)

    def _feature_stats(
        self, replies: list[Message], arrays: ArrayRecord
    ) -> StatsSum | None:
        """Sum the evaluate replies' feature statistics (head calibration on);
        the records are taken out of the replies (Flower's aggregation expects
        none). A malformed set is logged and left out."""
        if self.calibration is None:
            return None
        weight_key = head_keys(self.model_args)[0]
        stats = StatsSum(*arrays[weight_key].shape)
        for msg in replies:
            if msg.has_error():
                continue
            record = msg.content.array_records.get(keys.FEATURE_STATS_ARRAYS)
            if record is None:
                continue  # a node with no training image in the catalog's classes
            del msg.content[keys.FEATURE_STATS_ARRAYS]
            reason = stats.add({k: array_view(v) for k, v in record.items()})
            if reason is not None:
                log.warning(
                    "feature statistics of node %d left out: %s",
                    msg.metadata.src_node_id,
                    reason,
                )
        return stats

    def _calibrate(
        self, server_round: int, arrays: ArrayRecord, stats: StatsSum
    ) -> ArrayRecord:
        """CCVR: retrain the head on virtual features of every active class
        (fedobj.calibration), drawn from the statistics of this very model's
        features (the evaluate exchange computed them with the aggregate); the
        feature extractor is left as aggregated."""
        assert self.calibration is not None
        c = self.calibration
        weight_key, bias_key = head_keys(self.model_args)
        numpy = _numpy(arrays)
        done = calibrate_head(
            numpy[weight_key],
            numpy[bias_key],
            stats,
            self.class_map.active_indices,
            samples_per_class=c.samples,
            steps=c.steps,
            lr=c.lr,
            seed=self.seed * 1009 + server_round,
        )
        if done is None:
            log.info(
                "round %d: head not calibrated (feature statistics of fewer than "
                "2 classes from %d nodes)",
                server_round,
                stats.nodes,
            )
            return arrays
        numpy[weight_key], numpy[bias_key], info = done
        log.info(
            "round %d: head calibrated on %d virtual features of %d classes "
            "(statistics from %d nodes): loss %.3f -> %.3f",
            server_round,
            info.samples,
            info.classes,
            stats.nodes,
            info.loss_before,
            info.loss_after,
        )
        return _record(numpy)

    def _server_state(self) -> bytes | None:
        state = {
            f"{name}/{k}": v
            for name in ("m_t", "v_t")
            for k, v in (getattr(self.base, name, None) or {}).items()
        }
        if not state:
            return None
        buf = io.BytesIO()
        np.savez(buf, **state)  # type: ignore[arg-type]
        return buf.getvalue()

    def restore_server_state(self, version: VersionRecord) -> None:
        for name in ("m_t", "v_t"):
            if hasattr(self.base, name):
                setattr(self.base, name, None)
        if not version.server_state_uri or not hasattr(self.base, "m_t"):
            return
        sha = str(version.provenance.get("server_state_sha256", ""))
        data = self.store.read_verified(version.server_state_uri, sha)
        with np.load(io.BytesIO(data)) as npz:
            for name in ("m_t", "v_t"):
                setattr(
                    self.base,
                    name,
                    {
                        k.split("/", 1)[1]: npz[k]
                        for k in npz.files
                        if k.startswith(name + "/")
                    },
                )

    def _register(
        self,
        server_round: int,
        arrays: ArrayRecord,
        report: RoundReport,
        *,
        class_map: ClassMap,
        model_args: ModelArgs,
        server_state: bytes | None,
        parent: Any = None,
    ) -> VersionRecord:
        """Store the round's checkpoint and register its version.

        Parent: the version the round started from (``parent`` after a rollback,
        else the one the previous round registered). Current: yes, unless an admin
        moved the current version since this run last set it (their choice wins;
        the next round starts from it), or a later round already started from a
        rolled-back version, or ``promote="best"`` finds a better one.
        """
        key = f"{self.run_id}/round-{server_round:03d}"
        metrics = dict(report.central)
        ckpt = Checkpoint(
            model_args,
            class_map,
            arrays.to_torch_state_dict(),
            round=server_round,
            metrics=metrics,
            extra={"run_id": self.run_id},
        )
        art = self.store.save_checkpoint(f"{key}.pt", ckpt)
        provenance = dict(self.provenance)
        if report.privacy is not None:  # the next run continues this ledger
            provenance[PROVENANCE_KEY] = report.privacy
            metrics["central-dp-epsilon"] = float(report.privacy["epsilon"])
        state_uri = None
        if server_state is not None:
            state_art = self.store.put_bytes(
                f"{key}.server.npz", server_state, what="server state"
            )
            state_uri = state_art.uri
            provenance["server_state_sha256"] = state_art.sha256
        with self._versions_lock:  # against the check at the start of a round
            version = self.catalog.register_version(
                run_id=self.run_id,
                round=server_round,
                class_map=class_map,
                metrics=metrics,
                checkpoint_uri=art.uri,
                checkpoint_sha256=art.sha256,
                size_bytes=art.size,
                provenance=provenance,
                parent=parent if parent is not None else self.last_version_id,
                make_current=self._becomes_current(
                    server_round, report, metrics, class_map
                ),
                server_state_uri=state_uri,
            )
            self.last_version_id = version.id  # our model is this version now
            if version.is_current:
                self.expected_current = version.id
        return version

    def _becomes_current(
        self,
        server_round: int,
        report: RoundReport,
        metrics: dict[str, float],
        class_map: ClassMap,
    ) -> bool:
        """Whether the round's version is made current (see :meth:`_register`);
        called with the versions lock held."""
        if server_round < self.rollback_round:
            # a later round already continues from a rolled-back version
            log.info(
                "round %d: a later round continues from a rolled-back version; "
                "this round's version is registered but not made current",
                server_round,
            )
            return False
        current = self.catalog.current_version()
        if current is not None and current.id != self.expected_current:
            # an admin rolled back while this round ran: their choice wins, and the
            # next round continues from it (this round's version is kept, not current)
            log.info(
                "round %d: current version moved to %s during the round; "
                "this round's version is registered but not made current",
                server_round,
                current.name,
            )
            return False
        if self.promote == "best" and report.grew_from is None:
            best = self.catalog.best_version(class_map)
            acc = metrics.get("accuracy")
            return (
                best is None
                or best.accuracy is None
                or (acc is not None and acc >= best.accuracy)
            )
        return True

    def class_weights(self) -> dict[str, float]:
        """Per-image weights that make the round's active categories count the
        same: the mean of their image counts over each one's count.

        The counts are this run's: each node's images of a category, once, as
        its replies reported them (the catalog's ``sample_count`` adds up every
        run ever made, so a category added late would weigh several times the
        others). A category with no count yet (just added: its images were
        ignored until now) is left out and its images weigh 1, as under example
        weights; it is balanced from the round after its images are counted
        (two rounds after, with ``overlap``: counts are taken as rounds finish).
        """
        active = {e.slug for e in self.class_map.entries if e.active}
        with self._counts_lock:
            counts = {
                s: c for s, c in self.run_label_counts.items() if s in active and c > 0
            }
        if not counts:
            return {}
        mean = sum(counts.values()) / len(counts)
        return {slug: mean / count for slug, count in counts.items()}

    def _node_seen(self, n: NodeResult, class_map: ClassMap) -> None:
        """Keep ``Node`` rows and categories' ``sample_count`` real.

        A node's count of a category is added once per run (the first time it
        reports that category), so repeated rounds do not inflate the counts,
        and a category added mid-run is counted on the nodes that were counted
        before it existed (their images of it were ignored until then).
        """
        examples = count_of(n.metrics.get(keys.NUM_EXAMPLES))
        labels = n.labels
        if histogram_problem(labels, examples, class_map.slug_to_index) is not None:
            labels = {}  # says nothing true: not counted
        self.catalog.upsert_node(
            n.node_id,
            samples=examples,
            label_names=sorted(labels),
            dp_epsilon=n.metrics.get(keys.DP_EPSILON),
        )
        counted = self.counted_labels.setdefault(n.node_id, set())
        fresh = {slug: c for slug, c in labels.items() if slug not in counted}
        if fresh:
            unknown = self.catalog.add_sample_counts(fresh)  # deleted meanwhile
            counted.update(fresh)
            with self._counts_lock:
                self.run_label_counts.update(
                    {s: c for s, c in fresh.items() if s not in unknown}
                )

    def _record(self, report: RoundReport, replied: int) -> None:
        r = report.server_round
        for kind, results in (("train", report.train), ("evaluate", report.evaluate)):
            rejected = {b.node_id: b.error for b in report.rejected}
            for n in results:
                m = n.metrics
                error = n.error or (
                    rejected.get(n.node_id) if kind == "train" else None
                )
                self.catalog.record_node_round(
                    self.run_id,
                    r,
                    n.node_id,
                    kind,
                    num_examples=count_of(m.get(keys.NUM_EXAMPLES)),
                    loss=m.get(keys.TRAIN_LOSS if kind == "train" else keys.EVAL_LOSS),
                    accuracy=m.get(
                        keys.TRAIN_ACCURACY if kind == "train" else keys.EVAL_ACCURACY
                    ),
                    error=error,
                    train_seconds=m.get(keys.TRAIN_SECONDS)
                    if kind == "train"
                    else None,
                    dp_epsilon=m.get(keys.DP_EPSILON) if kind == "train" else None,
                )
                if kind == "train" and n.error is None:
                    self._node_seen(n, report.class_map)
        self.catalog.finish_round(
            self.run_id,
            r,
            replied=replied,
            rejected=len(report.rejected),
            accuracy=report.central.get("accuracy"),
            loss=report.central.get("loss"),
        )
