"""The inner Flower strategy: which one, and whether its mean can be streamed."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from apps.inner import make_inner_strategy, streams
from apps.perffedavg import PerfFedAvg
from fedobj import keys
from fedobj.config import RunConfig


def test_only_flowers_linear_means_are_streamed() -> None:
    assert streams(FedAvg()) and streams(FedProx()) and streams(PerfFedAvg())
    assert not streams(FedAdam())  # its step needs every reply's mean first

    class Clipped(FedAvg):  # a subclass may aggregate otherwise
        pass

    assert not streams(Clipped())


def test_central_dp_wraps_an_equal_weight_mean() -> None:
    cfg = RunConfig.from_flower({"min-nodes": 3, "central-dp": "server-fixed"})
    wrapped = make_inner_strategy(cfg, num_nodes=3)
    assert not streams(wrapped)  # the wrapper aggregates every reply together
    assert wrapped.strategy.weighted_by_key == keys.UNIT_WEIGHT  # type: ignore[attr-defined]
    plain = make_inner_strategy(RunConfig.from_flower({"min-nodes": 3}))
    assert plain.weighted_by_key == keys.NUM_EXAMPLES  # type: ignore[attr-defined]
