"""Every Opacus per-sample-gradient mode devices may use does the same DP-SGD maths.

The modes differ only in how per-sample gradient norms are obtained, so with the
noise off one DP-SGD step must move the weights by exactly the mean of the
per-sample gradients clipped to ``max_grad_norm``; that mean is computed here by
hand, one sample at a time, with no Opacus involved. The accounting (sample rate,
steps) must not depend on the mode either. Last, the benchmark script's smoke run
must work end to end and print its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.model.factory import ModelArgs, build_model
from fedobj.train import (
    DP_GRAD_SAMPLE_MODES,
    DpSettings,
    LabelledTensors,
    PrivateTrainResult,
    TrainConfig,
    dp_plan,
    to_input,
    train_private,
)

ROOT = Path(__file__).resolve().parents[2]
BATCH = 24


def _batch() -> LabelledTensors:
    data = load_fashion_mnist("train")  # the committed fixture (conftest)
    return LabelledTensors(
        torch.from_numpy(data.images[:BATCH].copy()),
        torch.from_numpy(data.labels[:BATCH].copy()),
    )


def _model() -> nn.Module:
    """The DP CNN with dropout off, so a step is a deterministic function."""
    torch.manual_seed(3)
    model = build_model(ModelArgs("cnn", 10, norm="group"))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _per_sample_norms_and_grads(
    model: nn.Module, data: LabelledTensors
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    grads, norms = [], []
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        x = to_input(data.images[i : i + 1])
        F.cross_entropy(model(x), data.labels[i : i + 1]).backward()
        g = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        grads.append(g)
        norms.append(torch.sqrt(torch.stack([(t * t).sum() for t in g]).sum()))
    return torch.stack(norms), grads


def _one_full_batch_step(
    mode: str, max_grad_norm: float, data: LabelledTensors
) -> tuple[nn.Module, PrivateTrainResult]:
    """One DP-SGD step over every sample (sample rate 1), lr 1, no noise."""
    model = _model()
    cfg = TrainConfig(
        epochs=1, batch_size=len(data), lr=1.0, momentum=0.0, weight_decay=0.0
    )
    run = train_private(model, data, cfg, DpSettings(0.0, max_grad_norm, mode))
    return model, run


@pytest.mark.parametrize("mode", DP_GRAD_SAMPLE_MODES)
def test_mode_steps_by_the_mean_of_hand_clipped_per_sample_gradients(
    mode: str,
) -> None:
    data = _batch()
    reference = _model()
    before = [p.detach().clone() for p in reference.parameters()]
    norms, grads = _per_sample_norms_and_grads(reference, data)
    # a bound between the norms, so some samples are clipped and some are not
    bound = float(norms.median())
    assert bool((norms > bound * 1.05).any()) and bool((norms < bound * 0.95).any())
    scale = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [
        w - sum(s * g[k] for s, g in zip(scale, grads)) / len(data)
        for k, w in enumerate(before)
    ]

    model, run = _one_full_batch_step(mode, bound, data)

    assert run.result.num_examples == len(data)  # rate 1: every sample drawn once
    for (name, got), want, w0 in zip(
        model.named_parameters(), expected, before, strict=True
    ):
        assert not torch.equal(got.detach(), w0), name  # the step moved it
        torch.testing.assert_close(
            got.detach(), want, rtol=1e-4, atol=2e-6, msg=f"{mode}: {name}"
        )


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_noise_has_its_scale_and_cannot_be_replayed_from_the_run_config(
    mode: str,
) -> None:
    """Every sample drawn (rate 1), lr 1: the step is -(clipped sum + noise) / 24
    with noise N(0, (sigma*C)^2) per coordinate; C is so small that the clipped
    sum is ~2% of the noise. Two runs with the same seed in the run config must
    not draw the same noise (the server knows that seed)."""
    data = _batch()
    cfg = TrainConfig(
        epochs=1, batch_size=len(data), lr=1.0, momentum=0.0, weight_decay=0.0
    )
    sigma, bound = 2.0, 0.01
    steps = []
    for _ in range(2):
        model = _model()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        train_private(model, data, cfg, DpSettings(sigma, bound, mode))
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        steps.append(after - before)
    want = sigma * bound / len(data)
    for step in steps:
        assert float(step.std()) == pytest.approx(want, rel=0.02)
        assert abs(float(step.mean())) < want / 100
    assert float((steps[0] - steps[1]).std()) == pytest.approx(
        want * 2**0.5, rel=0.02
    )  # independent draws, not the same noise twice


def test_accounting_does_not_depend_on_the_mode() -> None:
    one = _batch()
    data = LabelledTensors(one.images.repeat(4, 1, 1, 1), one.labels.repeat(4))
    cfg = TrainConfig(epochs=2, batch_size=16)
    plans = set()
    for mode in DP_GRAD_SAMPLE_MODES:
        run = train_private(_model(), data, cfg, DpSettings(1.0, 1.0, mode))
        plans.add((run.sample_rate, run.steps))
    assert plans == {dp_plan(len(data), cfg)} == {(16 / 96, 12)}


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="dp-grad-sample-mode"):
        train_private(_model(), _batch(), TrainConfig(), DpSettings(1.0, 1.0, "x"))


def test_auto_is_what_devices_use_by_default_and_picks_bk_where_it_can() -> None:
    import tomllib

    from fedobj.config import RunConfig
    from fedobj.errors import ConfigError
    from fedobj.train import resolve_grad_sample_mode

    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"
    ]["config"]
    assert app_config["dp-grad-sample-mode"] == "auto"
    assert RunConfig.from_flower(app_config).privacy.dp_grad_sample_mode == "auto"
    assert DpSettings(1.0, 1.0).grad_sample_mode == "auto"
    with pytest.raises(ConfigError, match="dp-grad-sample-mode"):
        RunConfig.from_flower({"dp-grad-sample-mode": "vmap"})
    example = to_input(_batch().images[:2])
    assert resolve_grad_sample_mode("auto", _model(), example) == "bk"
    assert resolve_grad_sample_mode("ghost", _model(), example) == "ghost"
    # MobileNetV3's residual `out += x` rules book-keeping out: ghost instead
    mobilenet = build_model(
        ModelArgs("mobilenet_v3_small", 10, in_channels=1, image_size=32, norm="group")
    )
    x = torch.zeros(2, 1, 32, 32)
    assert resolve_grad_sample_mode("auto", mobilenet, x) == "ghost"


def test_bench_quick_run_prints_every_figure(fmnist_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "simulations" / "bench" / "privacy.py"),
            "--quick",
            "--dataset-dir",
            str(fmnist_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = [r for r in lines if r["bench"] == "privacy_step"]
    assert {r["mode"] for r in steps} >= set(DP_GRAD_SAMPLE_MODES) - {"auto"}
    for r in steps:
        assert r["plain_ms"] > 0 and r["dp_ms"] > 0
        assert r["ratio"] == pytest.approx(r["dp_ms"] / r["plain_ms"], rel=0.01)
    acc = {r["epsilon"]: r for r in lines if r["bench"] == "privacy_accuracy"}
    assert set(acc) == {None, 1.0, 4.0, 8.0}
    for eps in (1.0, 4.0, 8.0):
        # the calibrated noise spends the budget, and not more
        assert eps * 0.95 <= acc[eps]["epsilon_spent"] <= eps
        assert acc[eps]["noise_multiplier"] > 0
    assert acc[1.0]["noise_multiplier"] > acc[8.0]["noise_multiplier"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in acc.values())
