"""RoundInstructions alone: what each train and evaluate config carries."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from apps.growth import HeadGrowth
from apps.instructions import RoundInstructions
from apps.records import get_model_context
from fedobj import keys
from fedobj.calibration import CalibrationSettings
from fedobj.classmap import ClassMap
from fedobj.model import ModelArgs

W, B = "classifier.weight", "classifier.bias"


def grown_at_round_3(**growth_kw: int) -> HeadGrowth:
    """A 2-class model whose catalog gains a third class before round 3."""
    growth = HeadGrowth(ModelArgs("cnn", 2), **growth_kw)  # type: ignore[arg-type]
    growth.start_from(ClassMap.from_names([("A", "a"), ("B", "b")]))
    arrays = ArrayRecord(
        {W: Array(np.zeros((2, 4), np.float32)), B: Array(np.zeros(2, np.float32))}
    )
    growth.grow(arrays, ClassMap.from_names([("A", "a"), ("B", "b"), ("C", "c")]), 3)
    return growth


def test_the_learning_rate_follows_one_schedule_through_a_growth() -> None:
    schedule = [1.0, 0.5, 0.25, 0.125]

    def lr(r: int) -> float:
        return schedule[r - 1]

    plan = RoundInstructions(grown_at_round_3(), lr)
    assert [plan.lr_at(3), plan.lr_at(4)] == [0.25, 0.125]
    plan = RoundInstructions(grown_at_round_3(), lr)
    plan.lr_phase_start = 2  # a resumed run keeps the interrupted run's schedule
    assert plan.lr_at(2) == 1.0


def test_a_train_config_carries_the_round_and_the_model_context() -> None:
    plan = RoundInstructions(
        grown_at_round_3(distill_rounds=2), lambda r: 0.1 * r, central_dp="server-fixed"
    )
    base = ConfigRecord({"local-epochs": 2})
    config = plan.train(4, base)
    assert config[keys.LR] == 0.4 and config["local-epochs"] == 2
    assert config[keys.DISTILL_CLASSES] == 2  # round 4: in the window from round 3
    assert config[keys.CENTRAL_DP] == "server-fixed"
    args, class_map = get_model_context(config)
    assert args.num_classes == 3 and class_map.num_classes == 3
    assert dict(base) == {"local-epochs": 2}  # the caller's config is not edited
    assert plan.train(5, base)[keys.DISTILL_CLASSES] == 0
    assert keys.CENTRAL_DP not in RoundInstructions(grown_at_round_3(), float).train(
        4, base
    )


def test_an_evaluate_config_asks_for_feature_statistics_when_calibrating() -> None:
    base = ConfigRecord()
    calibrating = RoundInstructions(
        grown_at_round_3(), float, calibration=CalibrationSettings()
    )
    assert calibrating.evaluate(base)[keys.FEATURE_STATS] is True
    plain = RoundInstructions(grown_at_round_3(), float).evaluate(base)
    assert keys.FEATURE_STATS not in plain and keys.CLASS_MAP in plain
    assert dict(base) == {}
