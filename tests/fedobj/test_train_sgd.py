"""FusedSGD: torch's SGD(fused=True) to the bit, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from fedobj.train.sgd import FusedSGD
from tests.conftest import ROOT


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("weight_decay", [5e-4, 0.0])
def test_fused_sgd_matches_torch_sgd_bit_for_bit(
    momentum: float, weight_decay: float
) -> None:
    ours, theirs = _model(3), _model(3)
    opt_a = FusedSGD(ours.parameters(), 0.03, momentum, weight_decay)
    opt_b = torch.optim.SGD(
        theirs.parameters(),
        lr=0.03,
        momentum=momentum,
        weight_decay=weight_decay,
        fused=True,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_parameters_without_a_gradient_are_left_alone() -> None:
    model = _model(1)
    conv, head = model[0], model[3]
    assert isinstance(conv, nn.Conv2d) and isinstance(head, nn.Linear)
    frozen = head.weight.detach().clone()
    opt = FusedSGD(model.parameters(), 0.1, 0.9)
    opt.zero_grad()
    conv.weight.grad = torch.ones_like(conv.weight)
    opt.step()
    assert torch.equal(head.weight, frozen)
    assert head.weight.grad is None


def test_integer_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="float32"):
        FusedSGD([nn.Parameter(torch.zeros(2, dtype=torch.int64), False)], 0.1)


def test_training_imports_no_torch_dynamo() -> None:
    """A train message on a SuperNode is a fresh process: torch.optim's
    ``torch._dynamo`` import (1.4-1.8 s) must stay out of it."""
    code = (
        "import sys, torch\n"
        "from fedobj.model.factory import ModelArgs, build_model\n"
        "from fedobj.train import LabelledTensors, TrainConfig, train\n"
        "m = build_model(ModelArgs('cnn', 10, 1, 28, 'group'))\n"
        "d = LabelledTensors(torch.zeros(8, 1, 28, 28, dtype=torch.uint8),"
        " torch.arange(8) % 10)\n"
        "train(m, d, TrainConfig(epochs=1, batch_size=4, lr=0.01, momentum=0.9,"
        " weight_decay=5e-4, seed=1))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "False", out.stderr
