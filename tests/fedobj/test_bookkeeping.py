"""Book-keeping clipping: one backward pass gives the sum of clipped per-sample
gradients that a per-sample loop computes by hand, for every layer kind it takes.

The end-to-end check (a DP-SGD step in ``train_private`` with mode ``"bk"``
moves the weights by the hand-clipped mean) is in ``test_privacy_modes.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedobj.bookkeeping import BookKeepingClipper, unsupported_layers
from fedobj.errors import ConfigError
from fedobj.model.factory import ModelArgs, build_model
from fedobj.privacy import check_dp_compatible


class Mixed(nn.Module):
    """Every path: conv with and without bias, grouped (depthwise) conv,
    GroupNorm, LayerNorm, a linear layer on 3-D input (per-sample path), a
    frozen layer, and linear layers on 2-D input (norm path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.frozen = nn.Conv2d(8, 8, 1)
        self.frozen.requires_grad_(False)
        self.seq = nn.Linear(3, 5)  # over the 3x3 map's rows: 3-D input
        self.ln = nn.LayerNorm(5)
        self.hidden = nn.Linear(8 * 3 * 5, 16)
        self.head = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.conv(x)))
        x = self.frozen(F.relu(self.depthwise(x)))  # 8 x 3 x 3
        x = self.ln(self.seq(x.flatten(1, 2)))  # (B, 24, 3) -> (B, 24, 5)
        return self.head(F.relu(self.hidden(x.flatten(1))))


def _hand_clipped(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample gradients one sample at a time, clipped as Opacus does."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads, norms = [], []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        g = torch.autograd.grad(loss, list(params.values()))
        grads.append(g)
        norms.append(torch.sqrt(sum((t * t).sum() for t in g)))
    norm = torch.stack(norms)
    scale = (bound / (norm + 1e-6)).clamp(max=1.0)
    summed = {
        n: sum(s * g[k] for s, g in zip(scale, grads, strict=True))
        for k, n in enumerate(params)
    }
    return norm, summed  # type: ignore[return-value]


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.eval()  # no dropout: the same function sample by sample and batched
    norms, want = _hand_clipped(model, x, y, bound=1.0)
    bound = float(norms.median())  # some samples clipped, some not
    norms, want = _hand_clipped(model, x, y, bound)
    assert bool((norms > bound * 1.01).any()) and bool((norms < bound * 0.99).any())

    clipper = BookKeepingClipper(model, bound)
    got_norms = clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    clipper.remove()

    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name  # a frozen layer is left alone
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_clipped_sum_equals_the_per_sample_loop_for_every_layer_kind() -> None:
    torch.manual_seed(0)
    model = Mixed()
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 4, (10,))
    _check(model, x, y)


@pytest.mark.parametrize("channels_last", [False, True])
def test_clipped_sum_equals_the_per_sample_loop_for_the_dp_cnn(
    channels_last: bool,
) -> None:
    torch.manual_seed(1)
    model = build_model(ModelArgs("cnn", 10, norm="group"))
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _check(model, x, y)


def test_a_residual_that_adds_in_place_is_refused_before_round_1() -> None:
    """MobileNetV3's blocks do ``result += input`` on a GroupNorm's output: the
    backprop asked for would be the sum's, so the clipper refuses, and the
    server's check says so before round 1; ghost clipping takes the model."""
    model = build_model(
        ModelArgs("mobilenet_v3_small", 5, in_channels=3, image_size=32, norm="group")
    )
    assert unsupported_layers(model) == []  # every layer has a sampler ...
    with pytest.raises(ConfigError, match='"bk" cannot clip.*in place.*"ghost"'):
        check_dp_compatible(model, "bk", (3, 32, 32))
    check_dp_compatible(model, "ghost", (3, 32, 32))
    assert all(p.grad is None for p in model.parameters())  # the probe left none
    check_dp_compatible(build_model(ModelArgs("cnn", 10, norm="group")), "bk")


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))  # no per-sample gradient function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_layers_without_a_per_sample_gradient_are_named_and_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _Scaled())
    assert unsupported_layers(model) == ["1 (_Scaled)"]
    with pytest.raises(ValueError, match=r"1 \(_Scaled\)"):
        BookKeepingClipper(model, 1.0)
    with pytest.raises(ConfigError, match=r'"bk".*1 \(_Scaled\)'):
        check_dp_compatible(model, "bk")
    check_dp_compatible(model, "ghost")  # Opacus' validator has no objection
    with pytest.raises(ValueError, match="max_grad_norm"):
        BookKeepingClipper(nn.Linear(2, 2), 0.0)


def test_a_layer_run_twice_or_not_at_all_is_an_error() -> None:
    layer = nn.Linear(4, 4)
    clipper = BookKeepingClipper(layer, 1.0)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="ran twice"):
        layer(layer(x))
    clipper.remove()

    twice = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    clipper = BookKeepingClipper(twice, 1.0)
    with pytest.raises(RuntimeError, match="did not run"):
        clipper.backward(twice[0](x).sum(1))


def test_forward_passes_without_grad_record_nothing() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    clipper = BookKeepingClipper(model, 1.0)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        model(x)  # an evaluation in between
    norms = clipper.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert norms.shape == (5,) and bool((norms > 0).all())


def test_shared_parameters_and_a_frozen_batchnorm_are_refused() -> None:
    from fedobj.train import DpSettings, LabelledTensors, TrainConfig, train_private

    first = nn.Linear(4, 4)
    tied = nn.Sequential(first, nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = first.weight
    with pytest.raises(ValueError, match="shared by two layers"):
        BookKeepingClipper(tied, 1.0)
    # no trainable parameter, yet it mixes the samples of a batch: no DP bound
    mixing = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
        nn.Linear(4 * 26 * 26, 2),
    )
    data = LabelledTensors(
        torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    )
    for mode in ("bk", "ghost"):  # Opacus' validator passes it: it is not trainable
        with pytest.raises(ValueError, match=r"BatchNorm mixes samples.*1 \(Batch"):
            train_private(
                mixing, data, TrainConfig(batch_size=4), DpSettings(1, 1, mode)
            )
    with pytest.raises(ConfigError, match="mixes a batch"):
        check_dp_compatible(mixing)
