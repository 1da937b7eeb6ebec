"""What a reply says, read alone (the rest is exercised in test_exchange.py)."""

from __future__ import annotations

import pytest
from flwr.app import MetricRecord, RecordDict

from apps.replies import weighs_examples
from fedobj import keys
from tests.apps.helpers import error_reply, reply, set_task_identity


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


@pytest.mark.parametrize(
    ("count", "weighs"),
    [(5, True), (0.5, True), (0, False), (-3, False), (float("nan"), False)],
)
def test_an_evaluate_reply_weighs_by_a_positive_example_count(
    count: float, weighs: bool
) -> None:
    metrics = MetricRecord({keys.NUM_EXAMPLES: count, keys.EVAL_LOSS: 1.0})
    assert weighs_examples(reply(11, RecordDict({keys.METRICS: metrics}))) is weighs


def test_a_reply_without_a_count_or_with_an_error_weighs_nothing() -> None:
    no_count = MetricRecord({keys.EVAL_LOSS: 1.0})
    assert not weighs_examples(reply(11, RecordDict({keys.METRICS: no_count})))
    assert not weighs_examples(reply(11, RecordDict()))
    assert not weighs_examples(error_reply(12, "declined"))
