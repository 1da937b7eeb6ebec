"""HeadCalibrator alone: summing the nodes' feature statistics, calibrating the head."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MessageType, MetricRecord, RecordDict

from apps.head_calibration import HeadCalibrator
from fedobj import keys
from fedobj.calibration import CalibrationSettings, StatsSum
from tests.apps.helpers import error_reply, reply, set_task_identity

W, B = "classifier.weight", "classifier.bias"


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def stats_of(
    features: dict[int, np.ndarray], classes: int = 3
) -> dict[str, np.ndarray]:
    dim = next(iter(features.values())).shape[1]
    count, total = np.zeros(classes), np.zeros((classes, dim))
    outer = np.zeros((classes, dim, dim))
    for c, f in features.items():
        count[c], total[c], outer[c] = len(f), f.sum(0), f.T @ f
    return {"count": count, "sum": total, "outer": outer}


def evaluate_reply(node: int, stats: dict[str, np.ndarray] | None) -> object:
    content = RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 4})})
    if stats is not None:
        content[keys.FEATURE_STATS_ARRAYS] = record(stats)
    return reply(node, content, MessageType.EVALUATE)


def model() -> ArrayRecord:
    return record(
        {
            "features.weight": np.ones((2, 2), np.float32),
            W: np.zeros((3, 2), np.float32),
            B: np.zeros(3, np.float32),
        }
    )


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def test_statistics_are_summed_taken_out_and_malformed_ones_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = stats_of({0: np.array([[1.0, 2.0], [3.0, 4.0]])})
    bad = stats_of({0: np.ones((2, 2))}, classes=2)  # a head of 2 rows, not 3
    replies = [
        evaluate_reply(11, good),
        evaluate_reply(12, bad),
        evaluate_reply(13, None),  # no training image of the catalog's classes
        error_reply(14, "declined"),
    ]
    calibrator = HeadCalibrator(CalibrationSettings())
    with caplog.at_level("WARNING", logger="fedobj"):
        stats = calibrator.feature_stats(replies, model(), (W, B))  # type: ignore[arg-type]
    assert stats.nodes == 1
    np.testing.assert_array_equal(stats.sums["count"], [2, 0, 0])
    np.testing.assert_array_equal(stats.sums["sum"][0], [4.0, 6.0])
    assert (
        "feature statistics of node 12 left out: feature stats 'count'" in caplog.text
    )
    for r in replies[:3]:  # Flower's aggregation expects no other record
        assert keys.FEATURE_STATS_ARRAYS not in r.content.array_records  # type: ignore[attr-defined]


def test_the_head_is_retrained_on_virtual_features_of_the_active_classes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Classes 0 and 1 sit at (2, 0) and (-2, 0); the zero head cannot tell them
    apart, the calibrated one puts each mean in its class. Row 2 (no statistics)
    and the feature extractor stay as they were."""
    rng = np.random.default_rng(0)
    features = {0: [2.0, 0.0] + 0.1 * rng.normal(size=(50, 2))}
    features[1] = [-2.0, 0.0] + 0.1 * rng.normal(size=(50, 2))
    stats = StatsSum(3, 2)
    assert stats.add(stats_of(features)) is None
    settings = CalibrationSettings(samples=50, steps=50, lr=0.5)
    calibrator = HeadCalibrator(settings, seed=3)
    with caplog.at_level("INFO", logger="fedobj"):
        out = calibrator.calibrate(4, model(), stats, (W, B), [0, 1, 2])
    w, b = out[W].numpy(), out[B].numpy()
    logits = np.array([[2.0, 0.0], [-2.0, 0.0]]) @ w.T + b
    assert list(logits[:, :2].argmax(1)) == [0, 1]
    assert list(w[2]) == [0.0, 0.0] and b[2] == 0.0
    np.testing.assert_array_equal(out["features.weight"].numpy(), np.ones((2, 2)))
    assert (
        "round 4: head calibrated on 100 virtual features of 2 classes" in caplog.text
    )
    again = calibrator.calibrate(4, model(), stats, (W, B), [0, 1, 2])
    np.testing.assert_array_equal(again[W].numpy(), w)  # seeded by seed and round


def test_statistics_of_one_class_leave_the_head_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = StatsSum(3, 2)
    stats.add(stats_of({0: np.array([[1.0, 2.0], [3.0, 4.0]])}))
    arrays = model()
    with caplog.at_level("INFO", logger="fedobj"):
        out = HeadCalibrator(CalibrationSettings()).calibrate(
            2, arrays, stats, (W, B), [0, 1, 2]
        )
    assert out is arrays
    assert "round 2: head not calibrated" in caplog.text
