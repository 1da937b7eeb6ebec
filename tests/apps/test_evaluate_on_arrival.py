"""evaluate-on-arrival: nodes score the model they receive inside the train
message, so a round is one message per node, not two (on a SuperNode every
message starts a ClientApp process: simulations/bench/deploy_rounds.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from apps.client_app import app as client_app
from apps.exchange import NodeOutcome
from apps.records import model_to_arrays, put_model_context
from apps.strategy import arrival_outcomes
from fedobj import keys
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.errors import ConfigError
from fedobj.model.factory import ModelArgs, build_model
from tests.apps.helpers import instruction
from tests.conftest import FIXTURE_FMNIST, write_image_folder


def _train_message(evaluate_first: bool):
    args = ModelArgs("cnn", 10, 1, 28, "group")
    slugs = load_fashion_mnist("test", FIXTURE_FMNIST).label_slugs
    class_map = ClassMap.from_names((s, s) for s in slugs)
    config = ConfigRecord({keys.LR: 0.01, keys.SERVER_ROUND: 1})
    if evaluate_first:
        config[keys.EVALUATE_FIRST] = True
    put_model_context(config, args, class_map)
    content = RecordDict(
        {keys.ARRAYS: model_to_arrays(build_model(args)), keys.CONFIG: config}
    )
    return instruction(5, content, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("evaluate_first", [True, False])
def test_a_train_reply_carries_the_received_models_score_when_asked(
    tmp_path: Path, evaluate_first: bool
) -> None:
    root = write_image_folder(tmp_path / "device", per_class=12)
    context = Context(
        7,
        5,
        {keys.NODE_DATA_DIR: str(root), keys.NODE_CACHE_DIR: str(tmp_path / "c")},
        RecordDict(),
        {"eval-fraction": 0.25},
    )
    out = client_app(message=_train_message(evaluate_first), context=context)
    assert not out.has_error(), out.error
    metrics = out.content.metric_records[keys.METRICS]
    assert metrics[keys.NUM_EXAMPLES] > 0
    if not evaluate_first:
        assert keys.EVAL_EXAMPLES not in metrics
        return
    # an untrained model on held-out images: counted, scored, near chance
    assert metrics[keys.EVAL_EXAMPLES] == pytest.approx(0.25 * 120, abs=10)
    assert 0.0 <= metrics[keys.EVAL_ACCURACY] <= 0.5
    assert metrics[keys.EVAL_LOSS] > 1.0


def test_arrival_scores_become_the_rounds_evaluate_outcomes() -> None:
    train = [
        NodeOutcome(
            1,
            {
                keys.NUM_EXAMPLES: 90,
                keys.EVAL_EXAMPLES: 10,
                keys.EVAL_ACCURACY: 0.7,
                keys.EVAL_LOSS: 0.9,
            },
        ),
        NodeOutcome(2, {keys.NUM_EXAMPLES: 50}),  # did not score: not counted
        NodeOutcome(3, error="declined", failure="error"),
    ]
    outcomes = arrival_outcomes(train)
    assert [o.node_id for o in outcomes] == [1]
    assert outcomes[0].metrics == {
        keys.NUM_EXAMPLES: 10,
        keys.EVAL_LOSS: 0.9,
        keys.EVAL_ACCURACY: 0.7,
    }


def test_evaluate_on_arrival_is_refused_with_head_calibration() -> None:
    with pytest.raises(ConfigError, match="`evaluate-on-arrival`"):
        RunConfig.from_flower(
            {
                "evaluate-on-arrival": True,
                "head-calibration": "virtual-features",
                "fraction-evaluate": 1.0,
            }
        )
