"""The Flower strategy that samples and aggregates inside fedobj's round loop.

``CatalogStrategy`` (apps/strategy.py) owns the loop and hands sampling and
aggregation to one of Flower's own strategies, named by the run config's
``strategy`` and, with ``central-dp``, wrapped in Flower's DP wrapper. Kept apart
so that the loop does not depend on which one, and the choice is tested alone.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from apps.central_dp import wrap_central_dp
from apps.perffedavg import PerfFedAvg
from fedobj import keys
from fedobj.config import RunConfig

STREAMING = (FedAvg, FedProx, PerfFedAvg)
"""Strategies whose mean the loop can fold as replies arrive (apps/exchange.py);
FedAdam and any wrapper need every reply together."""


def make_inner_strategy(
    cfg: RunConfig, num_nodes: int | None = None, ledger: dict[str, Any] | None = None
) -> Strategy:
    """Flower's strategy named by ``strategy`` in the run config.

    With ``central-dp`` it is wrapped in Flower's DP wrapper (apps/central_dp.py),
    which needs the number of connected nodes and continues ``ledger``, the
    accountant state an earlier run recorded.
    """
    base = _base_strategy(cfg)
    if cfg.privacy.central_dp == "none":
        return base
    if num_nodes is None:
        raise ValueError("central DP needs the number of connected nodes")
    return wrap_central_dp(base, cfg, num_nodes, ledger)


def streams(strategy: Strategy) -> bool:
    """Whether replies can be folded into ``strategy``'s mean as they arrive
    (exactly these classes: a subclass or a wrapper may aggregate otherwise)."""
    return type(strategy) in STREAMING


def _base_strategy(cfg: RunConfig) -> FedAvg:
    # central DP's noise assumes an equal-weight mean (apps/central_dp.py)
    private = cfg.privacy.central_dp != "none"
    weight = keys.UNIT_WEIGHT if private else keys.NUM_EXAMPLES
    t = cfg.training
    common: dict[str, Any] = dict(
        fraction_train=t.fraction_train,
        fraction_evaluate=cfg.evaluation.fraction_evaluate,
        min_train_nodes=t.min_nodes,
        min_evaluate_nodes=min(t.min_nodes, 2),
        min_available_nodes=t.min_nodes,
        weighted_by_key=weight,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )
    if t.strategy == "fedavg":
        return FedAvg(**common)
    if t.strategy == "fedprox":
        return FedProx(**common, proximal_mu=t.proximal_mu)
    if t.strategy == "fedadam":
        return FedAdam(**common, eta=t.server_lr, eta_l=t.lr)
    if t.strategy == "perffedavg":
        return PerfFedAvg(**common, perf_alpha=t.perf_alpha)
    raise ValueError(f"unknown strategy {t.strategy!r}")  # RunConfig rejects it first
