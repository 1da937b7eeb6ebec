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

import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Result, Strategy

from apps.exchange import NodeOutcome as NodeResult
from apps.exchange import ReplyFolder, exchange, outcome_of
from apps.perffedavg import PerfFedAvg
from apps.records import put_model_context
from fedobj import keys
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


def make_inner_strategy(cfg: RunConfig) -> FedAvg:
    """Flower's strategy named by ``strategy`` in the run config."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=min(cfg.min_nodes, 2),
        min_available_nodes=cfg.min_nodes,
        weighted_by_key=keys.NUM_EXAMPLES,
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
    distill_rounds
        After a growth, for this many rounds, train messages ask nodes to distil
        the old classes from the model they receive (``distill-classes``).
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
    ) -> None:
        if promote not in ("latest", "best"):
            raise ValueError(f"promote must be 'latest' or 'best', got {promote!r}")
        self.inner = inner
        # FedAvg, FedProx and PerfFedAvg aggregate as replies arrive; FedAdam
        # (and any wrapper) needs every reply together (apps/exchange.py)
        self.streams = type(inner) in (FedAvg, FedProx, PerfFedAvg)
        self.catalog = catalog
        self.store = store
        self.model_args = model_args
        self.run_id = run_id
        self.lr_fn = lr_fn
        self.head_init = head_init
        self.head_align = head_align
        self.grown_from: int | None = None  # classes before this run's last growth
        self.promote = promote
        self.min_replies = min_replies
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.provenance = dict(provenance or {})
        self.seed = seed
        self.class_map = ClassMap()
        self.last_version_id: Any = None
        self.reports: dict[int, RoundReport] = {}
        self.counted_nodes: set[int] = set()
        # the version the current model came from (parent of the next one), and
        # the version this run believes is current: a difference is an admin's move
        self.expected_current: Any = None
        self.distill_rounds = distill_rounds
        self.lr_restart_on_growth = lr_restart_on_growth
        self.lr_phase_start = 1
        self.distill_classes = 0
        self.distill_until = 0

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
        config[keys.DISTILL_CLASSES] = (
            self.distill_classes if server_round <= self.distill_until else 0
        )
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
        return self.inner.configure_evaluate(
            server_round, arrays, self._context(config), grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
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
    ) -> Result:
        """Run ``num_rounds`` rounds starting at ``first_round`` (resume continues).

        ``class_map`` is what ``initial_arrays``' head means (default: the catalog's
        snapshot now); ``parent_version`` the version they came from, if any.
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
        self.lr_phase_start = first_round  # a resumed run starts its schedule over
        if parent_version is not None:  # continuing from it: follow a different current
            self.expected_current = parent_version
        else:  # a fresh model does not "roll back" to what an older run left current
            current = self.catalog.current_version()
            self.expected_current = current.id if current is not None else None
        result = Result()
        arrays = initial_arrays
        t_start = time.time()
        for server_round in range(first_round, first_round + num_rounds):
            arrays, report = self._round(
                grid, server_round, arrays, timeout, train_config, evaluate_config
            )
            result.arrays = arrays
            if report.central:
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(
                    dict(report.central)
                )
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
    ) -> tuple[ArrayRecord, RoundReport]:
        started = time.time()
        arrays, rolled_back = self._follow_rollback(arrays)
        snapshot = self.catalog.snapshot()  # once per round (contract 3)
        self._check_active(snapshot)
        arrays, grew_from = self._grow(arrays, snapshot)
        if grew_from is not None:
            self.grown_from = grew_from
        if grew_from is not None and self.lr_restart_on_growth:
            self.lr_phase_start = server_round  # new rows learn at the full rate
        if grew_from is not None and self.distill_rounds > 0:
            # LwF: for the next rounds nodes keep the old classes' outputs close to
            # the model they receive (DESIGN.md contract 4 keeps those rows intact)
            self.distill_classes = grew_from
            self.distill_until = server_round + self.distill_rounds - 1
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

        messages = list(self.configure_train(server_round, arrays, train_config, grid))
        report.sampled = len(messages)
        self.catalog.start_round(self.run_id, server_round, len(messages))
        folder = ReplyFolder(
            arrays,
            stream=self.streams,
            perf_alpha=getattr(self.inner, "perf_alpha", None),
        )
        exchange(grid, messages, timeout, folder)
        del messages
        report.train, report.rejected = folder.outcomes, folder.rejected
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
        del folder

        eval_msgs = list(
            self.configure_evaluate(server_round, arrays, evaluate_config, grid)
        )
        if eval_msgs:
            eval_replies: list[Message] = []
            exchange(grid, eval_msgs, timeout, eval_replies.append)
            report.evaluate = [outcome_of(m) for m in eval_replies]
            ok = [
                m for m in eval_replies if not m.has_error() and _num_examples(m) > 0
            ]  # Flower divides by the summed weights
            if ok:
                self.aggregate_evaluate(server_round, ok)
        if self.evaluate_fn is not None:
            report.central = self.evaluate_fn(server_round, arrays, self.class_map)
        report.version = self._register(server_round, arrays, report)
        self._record(report, valid_count)
        if self.on_round is not None:
            self.on_round(report)
        return arrays, report

    # ------------------------------------------------------------ steps

    def _follow_rollback(self, arrays: ArrayRecord) -> tuple[ArrayRecord, str | None]:
        """If an admin made another version current, continue from it."""
        current = self.catalog.current_version()
        if current is None or current.id == self.expected_current:
            return arrays, None
        ckpt = self.store.load_checkpoint(
            current.checkpoint_uri, current.checkpoint_sha256
        )
        self.class_map = ckpt.class_map
        self.model_args = ckpt.model_args
        self.restore_server_state(current)
        self.last_version_id = self.expected_current = current.id
        log.info(
            "rollback honoured: continuing from version %s (run %s, round %d)",
            current.name,
            current.run_id,
            current.round,
        )
        return ArrayRecord(ckpt.state_dict), current.name

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
            state = getattr(self.inner, name, None)
            if state:
                setattr(
                    self.inner,
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

    def _server_state(self) -> bytes | None:
        state = {
            f"{name}/{k}": v
            for name in ("m_t", "v_t")
            for k, v in (getattr(self.inner, name, None) or {}).items()
        }
        if not state:
            return None
        buf = io.BytesIO()
        np.savez(buf, **state)  # type: ignore[arg-type]
        return buf.getvalue()

    def restore_server_state(self, version: VersionRecord) -> None:
        for name in ("m_t", "v_t"):
            if hasattr(self.inner, name):
                setattr(self.inner, name, None)
        if not version.server_state_uri or not hasattr(self.inner, "m_t"):
            return
        sha = str(version.provenance.get("server_state_sha256", ""))
        data = self.store.read_verified(version.server_state_uri, sha)
        with np.load(io.BytesIO(data)) as npz:
            for name in ("m_t", "v_t"):
                setattr(
                    self.inner,
                    name,
                    {
                        k.split("/", 1)[1]: npz[k]
                        for k in npz.files
                        if k.startswith(name + "/")
                    },
                )

    def _register(
        self, server_round: int, arrays: ArrayRecord, report: RoundReport
    ) -> VersionRecord:
        key = f"{self.run_id}/round-{server_round:03d}"
        metrics = dict(report.central)
        ckpt = Checkpoint(
            self.model_args,
            self.class_map,
            arrays.to_torch_state_dict(),
            round=server_round,
            metrics=metrics,
            extra={"run_id": self.run_id},
        )
        art = self.store.save_checkpoint(f"{key}.pt", ckpt)
        provenance = dict(self.provenance)
        state_uri = None
        state = self._server_state()
        if state is not None:
            state_art = self.store.put_bytes(f"{key}.server.npz", state)
            state_uri = state_art.uri
            provenance["server_state_sha256"] = state_art.sha256
        make_current = True
        current = self.catalog.current_version()
        if current is not None and current.id != self.expected_current:
            # an admin rolled back while this round ran: their choice wins, and the
            # next round continues from it (this round's version is kept, not current)
            make_current = False
            log.info(
                "round %d: current version moved to %s during the round; "
                "this round's version is registered but not made current",
                server_round,
                current.name,
            )
        elif self.promote == "best" and report.grew_from is None:
            best = self.catalog.best_version(self.class_map)
            acc = metrics.get("accuracy")
            make_current = (
                best is None
                or best.accuracy is None
                or (acc is not None and acc >= best.accuracy)
            )
        version = self.catalog.register_version(
            run_id=self.run_id,
            round=server_round,
            class_map=self.class_map,
            metrics=metrics,
            checkpoint_uri=art.uri,
            checkpoint_sha256=art.sha256,
            size_bytes=art.size,
            provenance=provenance,
            parent=self.last_version_id,
            make_current=make_current,
            server_state_uri=state_uri,
        )
        self.last_version_id = version.id  # our model is this version now
        if version.is_current:
            self.expected_current = version.id
        return version

    def _node_seen(self, n: NodeResult) -> None:
        """Keep ``Node`` rows and categories' ``sample_count`` real.

        A node's label histogram is added to the categories' counts once per run
        (the first time it replies), so repeated rounds do not inflate them.
        """
        samples = sum(n.labels.values()) or int(n.metrics.get(keys.NUM_EXAMPLES, 0))
        self.catalog.upsert_node(
            n.node_id,
            samples=samples,
            label_names=sorted(n.labels),
            dp_epsilon=n.metrics.get(keys.DP_EPSILON),
        )
        if n.labels and n.node_id not in self.counted_nodes:
            self.catalog.add_sample_counts(n.labels)
            self.counted_nodes.add(n.node_id)

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
                    num_examples=int(m.get(keys.NUM_EXAMPLES, 0)),
                    loss=m.get(keys.TRAIN_LOSS if kind == "train" else keys.EVAL_LOSS),
                    accuracy=m.get(
                        keys.TRAIN_ACCURACY if kind == "train" else keys.EVAL_ACCURACY
                    ),
                    error=error,
                )
                if kind == "train" and n.error is None:
                    self._node_seen(n)
        self.catalog.finish_round(
            self.run_id,
            r,
            replied=replied,
            rejected=len(report.rejected),
            accuracy=report.central.get("accuracy"),
            loss=report.central.get("loss"),
        )
