"""AggregationWeights alone: this run's counts and the class-balanced weights."""

from __future__ import annotations

import pytest

from fedobj.aggregation_weights import AggregationWeights


def test_every_active_category_weighs_the_same_in_total() -> None:
    """30 t-shirts and 10 trousers (mean 20): a t-shirt weighs 20/30, a trouser 2,
    so each category totals 20. A category not active this round, or with no
    image counted yet, gets no weight (its images weigh 1)."""
    weights = AggregationWeights("class-balanced")
    weights.add({"t-shirt": 10, "trouser": 10})
    weights.add({"t-shirt": 20, "sneaker": 7, "bag": 0})
    active = {"t-shirt", "trouser", "bag", "coat"}
    assert weights.class_weights(active) == pytest.approx(
        {"t-shirt": 20 / 30, "trouser": 2.0}
    )
    assert weights.for_round(active) == weights.class_weights(active)
    assert weights.class_weights({"coat"}) == {}


def test_example_weights_leave_the_folder_alone() -> None:
    weights = AggregationWeights()
    weights.add({"t-shirt": 5})
    assert not weights.balanced and weights.for_round({"t-shirt"}) is None
    assert weights.counts == {"t-shirt": 5}  # still counted: bookkeeping feeds it


def test_modes_and_strategies_are_checked() -> None:
    with pytest.raises(ValueError, match="'examples' or 'class-balanced', got 'x'"):
        AggregationWeights("x")
    AggregationWeights().check_strategy(False, "FedAdam")  # examples: any strategy
    AggregationWeights("class-balanced").check_strategy(True, "FedAvg")
    with pytest.raises(ValueError, match="folds replies as they arrive.*not FedAdam"):
        AggregationWeights("class-balanced").check_strategy(False, "FedAdam")
