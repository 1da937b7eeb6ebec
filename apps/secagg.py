"""``secagg=true``: CatalogStrategy's rounds with Flower's SecAgg+ as the training step.

Route. Flower 1.41 has SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` is a
*fit workflow* that ``DefaultWorkflow`` calls once per round with a ``LegacyContext``
(a legacy ``Strategy`` that samples and aggregates ``FitIns``/``FitRes``). It needs
nothing else from ``DefaultWorkflow``: it reads the round number and the parameters
from ``context.state``, asks ``context.strategy.configure_fit`` for the instructions
and hands ``aggregate_fit`` results whose parameters are already the unmasked
weighted mean. So :class:`SecAggStrategy` keeps CatalogStrategy's whole round
(catalog snapshot, rollback, head growth, class map in every message, evaluation,
version and ``TrainingRound`` rows) and replaces only its training exchange
(``_train``) with one call of the workflow per round: the legacy strategy here
returns the very messages CatalogStrategy configured (class map, model args, learning
rate, as ``FitIns.config``) and keeps what comes back. Nodes answer through
``apps/secagg_client.py``.

Arithmetic (Flower's ``secaggplus_mod`` and ``unmask_stage``). With quantisation
range T, clipping range c, max weight W and modulus M = 2**32, node i with n_i <= W
examples sends its integer weight r_i = round(n_i T / W) <= T and, per value x_i,
q_i = stochastic_round((r_i/T * x_i + c) * T / (2c)) in [0, T] (values outside
[-c, c] are clipped first). The server recovers, modulo M, Q = sum q_i and
R = sum r_i; both are exact when k sampled nodes give k T < M (k < 1024 at
T = 2**22): hence ``min-nodes`` and each round's sample are refused above
(M - 1) // T. It returns (Q 2c/T - k c) T / R = sum r_i x_i / sum r_i + e with
|e| < 2ck / R (one rounding step per node), and sum r_i x_i / sum r_i differs from
the example-weighted mean by less than ck / R (each r_i is off by <= 1/2).
So, with N = sum n_i: |secure mean - weighted mean| < 3ck / (T N / W - k/2).

Why W matters. Flower's default W = 1000 lets a 6,000-image node scale its values by
r_i/T = 6: every value above c/6 is clipped and the mean is silently wrong (Flower
only logs "potential overflow"); and sum n_i / W >= M / T would wrap the weight sum.
The nodes here cap their weight at W instead (they then count less, never wrongly),
and W defaults to 100,000. A larger W costs precision: the bound grows with W / N.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from apps.exchange import NodeOutcome
from apps.strategy import CatalogStrategy, RoundReport
from fedobj import keys
from fedobj.config import SECAGG_MODULUS, RunConfig
from fedobj.errors import ConfigError

log = logging.getLogger("fedobj.secagg")


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters from the run config, in Flower's own types.

    ``num_shares`` and ``threshold`` follow Flower: a float is a share (of the
    sampled nodes, of the shares), an int a count.
    """

    num_shares: int | float
    threshold: int | float
    clipping_range: float
    quantization_range: int
    max_weight: float
    modulus: int = SECAGG_MODULUS

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SecAggSettings:
        def flower(v: float) -> int | float:
            return float(v) if v <= 1 else int(v)

        sec = cfg.secagg
        return cls(
            flower(sec.secagg_num_shares),
            flower(sec.secagg_reconstruction_threshold),
            sec.secagg_clipping_range,
            sec.secagg_quantization_range,
            sec.secagg_max_weight,
        )

    @property
    def max_nodes(self) -> int:
        """Most nodes per round whose summed quantised values stay below M."""
        return (self.modulus - 1) // self.quantization_range

    def sizes(self, k: int) -> tuple[int, int]:
        """(shares, threshold) Flower's ``setup_stage`` derives for ``k`` nodes."""
        if isinstance(self.num_shares, float):
            shares = round(self.num_shares * k)
            if shares < k and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = k
        else:
            shares = self.num_shares
        if isinstance(self.threshold, float):
            threshold = max(round(self.threshold * shares), 2)
        else:
            threshold = self.threshold
        return shares, threshold

    def check_nodes(self, k: int) -> tuple[int, int]:
        """Refuse a round of ``k`` nodes the protocol cannot run or sum exactly.

        Returns (neighbours per node, threshold): each node's masks can be removed
        while at least ``threshold`` of its neighbours (itself included) stay.
        """
        if k < 3:
            raise ConfigError(
                f"secagg=true needs >= 3 nodes per round, got {k} (`min-nodes`)"
            )
        if k > self.max_nodes:
            raise ConfigError(
                f"secagg=true: {k} nodes x secagg-quantization-range "
                f"{self.quantization_range} overflow the 2**32 modulus; sample at "
                f"most {self.max_nodes} nodes or lower the quantization range"
            )
        shares, threshold = self.sizes(k)
        if shares > k:
            raise ConfigError(
                f"run config `secagg-num-shares` gives {shares} shares for {k} nodes"
            )
        if shares < k and shares % 2 == 0:
            raise ConfigError(
                f"run config `secagg-num-shares` gives an even {shares} shares "
                f"for {k} nodes (Flower's neighbour ring needs an odd count)"
            )
        if not 2 <= threshold <= shares:
            raise ConfigError(
                f"run config `secagg-reconstruction-threshold` gives {threshold} "
                f"for {shares} shares: it must be in [2, {shares}]"
            )
        return shares, threshold

    def error_bound(self, k: int, total_examples: float) -> float:
        """Largest |secure mean - example-weighted mean| (module docstring)."""
        r_total = self.quantization_range * total_examples / self.max_weight - k / 2
        return 3 * self.clipping_range * k / r_total if r_total > 0 else float("inf")

    def workflow(self, timeout: float | None) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            self.num_shares,
            self.threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus,
            timeout=timeout,
        )


class _PreparedFit(LegacyStrategy):
    """The legacy strategy ``SecAggPlusWorkflow`` asks: instructions made elsewhere.

    ``configure_fit`` returns the instructions it was built with (CatalogStrategy
    sampled the nodes and wrote their config); ``aggregate_fit`` receives results
    whose parameters are all the unmasked weighted mean, keeps them, and returns
    that mean.
    """

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.aggregated: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = list(results)
        self.aggregated = results[0][1].parameters if results else None
        return self.aggregated, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


@dataclass
class SecureRound:
    """One SecAgg+ round: the unmasked mean (None if the protocol halted) and
    what each node reported in the clear (its weight and metrics) or that it
    dropped out."""

    arrays: ArrayRecord | None
    replied: list[NodeOutcome] = field(default_factory=list)
    dropped: list[NodeOutcome] = field(default_factory=list)
    total_weight: int = 0


def secure_round(
    grid: Grid,
    workflow: SecAggPlusWorkflow,
    server_round: int,
    messages: Iterable[Message],
    arrays: ArrayRecord,
) -> SecureRound:
    """Run one round of Flower's SecAgg+ on the train ``messages`` configured for it.

    Each message's config becomes its node's ``FitIns.config`` (with the array
    names, since legacy parameters are an unnamed list); the unmasked mean comes
    back under the broadcast names and dtypes, checked for shape and finiteness,
    the only checks left when the server sees a sum (contract 5, weakened).
    """
    names = list(arrays.keys())
    broadcast = {n: arrays[n].numpy() for n in names}
    parameters = ndarrays_to_parameters([broadcast[n] for n in names])
    run_id = grid.run.run_id
    manager = SimpleClientManager()
    instructions: list[tuple[ClientProxy, FitIns]] = []
    for msg in messages:
        proxy: ClientProxy = GridClientProxy(msg.metadata.dst_node_id, grid, run_id)
        manager.register(proxy)
        config: dict[str, Scalar] = dict(msg.content.config_records[keys.CONFIG])  # type: ignore[arg-type]
        config[keys.SECAGG_ARRAY_NAMES] = json.dumps(names)
        instructions.append((proxy, FitIns(parameters, config)))
    sampled = [p.node_id for p, _ in instructions]
    strategy = _PreparedFit(instructions)
    context = LegacyContext(
        Context(run_id, 0, {}, RecordDict(), {}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        parameters, keep_input=True
    )
    workflow(grid, context)

    out = SecureRound(None)
    for proxy, res in strategy.results:
        metrics = {k: float(v) for k, v in res.metrics.items() if _number(v)}
        out.replied.append(NodeOutcome(proxy.node_id, metrics))
        out.total_weight += res.num_examples
    answered = {o.node_id for o in out.replied}
    out.dropped = [
        NodeOutcome(n, error="dropped out of SecAgg+ (no masked update)")
        for n in sampled
        if n not in answered
    ]
    if strategy.aggregated is None or out.total_weight <= 0:
        return out
    mean = parameters_to_ndarrays(strategy.aggregated)
    if len(mean) != len(names) or any(
        m.shape != broadcast[n].shape or not np.isfinite(m).all()
        for n, m in zip(names, mean)
    ):
        log.warning("round %d: SecAgg+ aggregate malformed; ignored", server_round)
        return out
    out.arrays = ArrayRecord(
        {
            n: Array(np.ascontiguousarray(m.astype(broadcast[n].dtype)))
            for n, m in zip(names, mean)
        }
    )
    return out


def _check_float(arrays: ArrayRecord) -> None:
    """Integer buffers (BatchNorm's counters) cannot go through the quantiser."""
    bad = [n for n, a in arrays.items() if np.dtype(a.dtype).kind != "f"]
    if bad:
        raise ConfigError(
            f"secagg=true: non-float arrays {bad[:3]} cannot be averaged securely "
            '(use norm="group")'
        )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class SecAggStrategy(CatalogStrategy):
    """CatalogStrategy whose training exchange is Flower's SecAgg+ (see module doc).

    Weaker than the plain loop, by construction: no per-reply validation (the
    server sees only the sum: shapes and finiteness of the aggregate are all it can
    check), FedAvg only, no server-side clipping or DP, quantisation error.
    """

    def __init__(self, inner: Any, *, settings: SecAggSettings, **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self.settings = settings

    def summary(self) -> None:
        log.info("SecAgg+ (Flower's legacy workflow) with %s", self.settings)
        super().summary()

    def expected_sample(self, grid: Grid) -> int:
        """How many nodes the inner FedAvg samples from those connected now."""
        available = len(list(grid.get_node_ids()))
        fraction = float(getattr(self.inner, "fraction_train", 1.0))
        least = int(getattr(self.inner, "min_train_nodes", 0))
        return max(int(available * fraction), least)

    def start(  # type: ignore[override]
        self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any
    ) -> Any:
        """Refuse, before round 1, a federation the protocol cannot serve."""
        k = self.expected_sample(grid)
        neighbours, threshold = self.settings.check_nodes(k)
        _check_float(initial_arrays)
        log.info(
            "SecAgg+: %d nodes per round, %d neighbours each, threshold %d (up to "
            "%d dropouts per neighbourhood), clipping range %g, max weight %g",
            k,
            min(neighbours, k),
            threshold,
            min(neighbours, k) - threshold,
            self.settings.clipping_range,
            self.settings.max_weight,
        )
        return super().start(grid, initial_arrays, *args, **kwargs)

    def _train(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        timeout: float,
        train_config: ConfigRecord,
        report: RoundReport,
    ) -> tuple[ArrayRecord, int]:
        _check_float(arrays)  # a rollback may bring back a BatchNorm checkpoint
        messages = list(self.configure_train(server_round, arrays, train_config, grid))
        self.settings.check_nodes(len(messages))
        report.sampled = len(messages)
        self.catalog.start_round(self.run_id, server_round, len(messages))
        result = secure_round(
            grid, self.settings.workflow(timeout), server_round, messages, arrays
        )
        report.train, report.rejected = result.replied, result.dropped
        for bad in report.rejected:
            log.warning("round %d: node %d %s", server_round, bad.node_id, bad.error)
        valid = sum(1 for o in result.replied if o.metrics.get(keys.NUM_EXAMPLES, 0))
        if result.arrays is not None and valid >= self.min_replies:
            bound = self.settings.error_bound(len(result.replied), result.total_weight)
            log.info(
                "round %d: SecAgg+ mean of %d nodes (%d examples counted; "
                "quantisation error < %.2g)",
                server_round,
                valid,
                result.total_weight,
                bound,
            )
            return result.arrays, valid
        log.warning(
            "round %d: SecAgg+ gave no aggregate (%d nodes with examples): the "
            "model is unchanged",
            server_round,
            valid,
        )
        return arrays, valid


def catalog_strategy_class(cfg: RunConfig) -> Callable[..., CatalogStrategy]:
    """The round loop the run config asks for: plain, or with SecAgg+ training."""
    if not cfg.secagg.secagg:
        return CatalogStrategy
    return functools.partial(SecAggStrategy, settings=SecAggSettings.from_config(cfg))
