"""Strategies: Flower's own, selected by run config, wrapped by one that observes.

``RunStrategy`` follows the pattern of Flower's DP wrappers: it *is* a ``Strategy``,
holds an inner one, and overrides the four hooks to do its part before delegating.
Its part: every outgoing config carries the model arguments, the class map and the
round's learning rate (DESIGN.md contract 2); every reply's metrics are kept per node
so the run can write a row per node and round. Flower's ``start()`` still runs the
loop (the catalog-driven strategy that owns the loop comes with class growth).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from apps.records import put_model_context
from fedobj import keys
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.model.factory import ModelArgs


@dataclass
class NodeResult:
    """One node's reply in one round: its metrics, or why it failed."""

    node_id: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RoundRecord:
    """What the wrapper saw in one round, for the run's outputs and logs."""

    server_round: int
    started: float
    lr: float
    sampled: int = 0
    train: list[NodeResult] = field(default_factory=list)
    evaluate: list[NodeResult] = field(default_factory=list)


def make_inner_strategy(cfg: RunConfig) -> FedAvg:
    """Flower's strategy named by ``strategy`` in the run config."""
    common = dict(
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
        return FedAvg(**common)  # type: ignore[arg-type]
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)  # type: ignore[arg-type]
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)  # type: ignore[arg-type]
    raise ValueError(f"unknown strategy {cfg.strategy!r}")  # RunConfig rejects it first


def _node_results(replies: Iterable[Message]) -> tuple[list[Message], list[NodeResult]]:
    replies = list(replies)
    out = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.append(NodeResult(node, error=str(msg.error.reason)))
            continue
        values: dict[str, float] = {}
        for record in msg.content.metric_records.values():
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    values[k] = float(v)
        out.append(NodeResult(node, values))
    return replies, out


class RunStrategy(Strategy):
    """Decorates an inner Flower strategy with fedobj's round context and records."""

    def __init__(
        self,
        inner: Strategy,
        model_args: ModelArgs,
        class_map: ClassMap,
        lr_fn: Callable[[int], float],
    ) -> None:
        self.inner = inner
        self.model_args = model_args
        self.class_map = class_map
        self.lr_fn = lr_fn
        self.rounds: dict[int, RoundRecord] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        lr = self.lr_fn(server_round)
        record = RoundRecord(server_round, time.time(), lr)
        self.rounds[server_round] = record
        config[keys.LR] = lr
        put_model_context(config, self.model_args, self.class_map)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        record.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies, results = _node_results(replies)
        self.rounds[server_round].train = results
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        put_model_context(config, self.model_args, self.class_map)
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies, results = _node_results(replies)
        if server_round in self.rounds:
            self.rounds[server_round].evaluate = results
        return self.inner.aggregate_evaluate(server_round, replies)
