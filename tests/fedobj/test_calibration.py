"""Classifier calibration with virtual features (CCVR): exact per-class
statistics, exact pooling across nodes, and a head retrained to separate classes
no node holds together."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedobj.calibration import (
    COUNT,
    OUTER,
    SUM,
    StatsSum,
    calibrate_head,
    feature_stats,
    head_module,
)
from fedobj.config import RunConfig
from fedobj.errors import ConfigError
from fedobj.model.factory import ModelArgs, build_model, head_keys


def _cnn() -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    args = ModelArgs("cnn", 10, norm="group")
    return build_model(args), head_keys(args)[0]


def test_feature_stats_are_the_head_inputs_counts_sums_and_outer_products() -> None:
    model, key = _cnn()
    x, y = torch.randn(37, 1, 28, 28), torch.randint(0, 4, (37,))
    model.train()
    stats = feature_stats(model, x, y, key, 10, batch_size=8)
    assert model.training  # left as it was
    model.eval()
    with torch.no_grad():  # the classifier's input, by hand
        feats = model.hidden(model.pool(model.features(x))).double()
    for c in range(10):
        f = feats[y == c]
        assert stats[COUNT][c] == len(f)
        want = f.sum(0).numpy()
        np.testing.assert_allclose(stats[SUM][c], want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(
            stats[OUTER][c], (f.T @ f).numpy(), rtol=1e-5, atol=1e-3
        )
    assert stats[OUTER].shape == (10, 128, 128)
    assert head_module(model, key) is model.classifier
    with pytest.raises(TypeError):
        head_module(model, "hidden.0.weight")  # Flatten has no weight: not Linear


def test_summed_node_statistics_equal_the_pooled_datas() -> None:
    model, key = _cnn()
    x, y = torch.randn(30, 1, 28, 28), torch.randint(0, 10, (30,))
    total = StatsSum(10, 128)
    assert total.add(feature_stats(model, x[:12], y[:12], key, 10)) is None
    assert total.add(feature_stats(model, x[12:], y[12:], key, 10)) is None
    pooled = feature_stats(model, x, y, key, 10)
    for k in (COUNT, SUM, OUTER):
        np.testing.assert_allclose(total.sums[k], pooled[k], rtol=1e-5, atol=1e-3)
    assert total.nodes == 2


def test_bad_statistics_are_refused_and_change_nothing() -> None:
    total = StatsSum(3, 4)
    good = {COUNT: np.ones(3), SUM: np.zeros((3, 4)), OUTER: np.zeros((3, 4, 4))}
    assert "shape (2,)" in str(total.add({**good, COUNT: np.ones(2)}))
    assert "'outer'" in str(total.add({COUNT: good[COUNT], SUM: good[SUM]}))
    assert "non-finite" in str(total.add({**good, SUM: np.full((3, 4), np.nan)}))
    assert "negative" in str(total.add({**good, COUNT: -np.ones(3)}))
    assert total.nodes == 0 and not total.sums[COUNT].any()


def _gaussian_stats(
    means: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[StatsSum, list[np.ndarray]]:
    classes, dim = means.shape
    total = StatsSum(classes + 2, dim)  # two more rows: one inactive, one unreported
    samples = []
    for c in range(classes):
        f = means[c] + rng.normal(size=(n, dim))
        samples.append(f)
        stats = {
            COUNT: np.eye(classes + 2)[c] * n,
            SUM: np.zeros((classes + 2, dim)),
            OUTER: np.zeros((classes + 2, dim, dim)),
        }
        stats[SUM][c] = f.sum(0)
        stats[OUTER][c] = f.T @ f
        assert total.add(stats) is None  # one node per class: fully disjoint
    return total, samples


def test_calibration_separates_classes_no_node_holds_together() -> None:
    rng = np.random.default_rng(0)
    dim, classes = 16, 4
    means = rng.normal(scale=1.5, size=(classes, dim))
    stats, samples = _gaussian_stats(means, 300, rng)
    # a head pulled towards class 0 (the majority's tug): it predicts 0 always
    weight = np.zeros((classes + 2, dim), np.float32)
    bias = np.array([5.0, 0, 0, 0, 1.0, 2.0], np.float32)
    active = [0, 1, 2, 3, 5]  # 4: inactive; 5: active but nobody reported it

    def accuracy(w: np.ndarray, b: np.ndarray) -> float:
        right = 0
        for c, f in enumerate(samples):
            logits = f @ w[active].T + b[active]
            right += int((np.asarray(active)[logits.argmax(1)] == c).sum())
        return right / sum(len(f) for f in samples)

    assert accuracy(weight, bias) == pytest.approx(0.25)
    done = calibrate_head(weight, bias, stats, active, steps=200, seed=1)
    assert done is not None
    new_w, new_b, info = done
    assert accuracy(new_w, new_b) > 0.95
    assert info.classes == 4 and info.samples == 800
    assert info.loss_after < info.loss_before
    for row in (4, 5):  # inactive, unreported: untouched
        assert np.array_equal(new_w[row], weight[row]) and new_b[row] == bias[row]
    assert np.array_equal(weight, np.zeros_like(weight))  # inputs not modified
    # fewer than two classes with statistics: nothing to calibrate against
    assert calibrate_head(weight, bias, stats, [0, 4]) is None


def test_run_config_refuses_calibration_where_statistics_would_leak() -> None:
    on = {"head-calibration": "virtual-features", "fraction-evaluate": 1.0}
    assert RunConfig.from_flower(on).growth.head_calibration == "virtual-features"
    with pytest.raises(ConfigError, match="fraction-evaluate.*every node"):
        RunConfig.from_flower({**on, "fraction-evaluate": 0.5})
    leaks = [{"dp": True}, {"central-dp": "server-fixed"}, {"secagg": True}]
    for leak in leaks:
        with pytest.raises(ConfigError, match="head-calibration.*in the clear"):
            RunConfig.from_flower({"min-nodes": 3, **on, **leak})
    with pytest.raises(ConfigError, match="head-calibration"):
        RunConfig.from_flower({"head-calibration": "ccvr"})
