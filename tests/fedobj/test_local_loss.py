"""Local losses under label skew: restricted softmax (FedRS) and logit adjustment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedobj.config import RunConfig
from fedobj.errors import ConfigError
from fedobj.model import ModelArgs, build_model
from fedobj.train import (
    LabelledTensors,
    TrainConfig,
    adjusted_logits,
    local_loss_logits,
    restricted_logits,
    train,
)

finite = st.floats(-20, 20, allow_nan=False, width=32)


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B x C), labels drawn from a non-empty present set, and that set."""
    c = draw(st.integers(2, 8))
    b = draw(st.integers(1, 6))
    present = draw(st.lists(st.booleans(), min_size=c, max_size=c))
    if not any(present):
        present[draw(st.integers(0, c - 1))] = True
    values = draw(st.lists(finite, min_size=b * c, max_size=b * c))
    logits = torch.tensor(values, dtype=torch.float32).reshape(b, c)
    classes = [k for k in range(c) if present[k]]
    labels = torch.tensor(
        [classes[draw(st.integers(0, len(classes) - 1))] for _ in range(b)]
    )
    return logits, labels, torch.tensor(present)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_alpha_one_is_plain_cross_entropy(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    logits, labels, present = batch
    shaped = restricted_logits(logits, present, 1.0)
    assert torch.equal(shaped, logits)
    assert torch.allclose(
        F.cross_entropy(shaped, labels), F.cross_entropy(logits, labels)
    )


@settings(max_examples=60, deadline=None)
@given(batches())
def test_alpha_zero_leaves_absent_rows_no_gradient(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    logits, labels, present = batch
    logits.requires_grad_(True)
    F.cross_entropy(restricted_logits(logits, present, 0.0), labels).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[:, ~present] == 0)
    # the present rows still learn unless the loss is already saturated
    assert torch.isfinite(logits.grad).all()


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.0, 1.0))
def test_absent_rows_are_pushed_by_at_most_alpha(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], alpha: float
) -> None:
    """d loss / d z_absent = alpha * p_absent / B: non-negative (a push down),
    and all absent rows together get at most alpha (plain CE: up to 1)."""
    logits, labels, present = batch
    x = logits.clone().requires_grad_(True)
    F.cross_entropy(restricted_logits(x, present, alpha), labels).backward()
    assert x.grad is not None
    push = x.grad[:, ~present]
    assert torch.all(push >= 0)
    assert float(push.sum()) <= alpha + 1e-5


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(0.0, 3.0))
def test_logit_adjustment_masks_absent_and_offsets_by_log_prior(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tau: float
) -> None:
    logits, labels, present = batch
    counts = torch.bincount(labels, minlength=logits.shape[1])
    counts[present & (counts == 0)] = 1  # present in the node's data, not the batch
    shaped = adjusted_logits(logits, counts, tau)
    assert torch.all(torch.isneginf(shaped[:, counts == 0]))
    prior = counts[counts > 0].float() / counts.sum()
    expected = logits[:, counts > 0] + tau * torch.log(prior)
    assert torch.allclose(shaped[:, counts > 0], expected, atol=1e-5)
    loss = F.cross_entropy(shaped, labels)
    assert math.isfinite(float(loss))


def test_logit_adjustment_with_uniform_prior_is_masked_softmax() -> None:
    """Equal local counts shift every present logit alike: the softmax over the
    present classes is unchanged, the absent ones are out of it."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([5, 0, 5, 0])
    shaped = adjusted_logits(logits, counts, 1.0)
    p = F.softmax(shaped, dim=1)
    assert p[0, 1] == 0 and p[0, 3] == 0
    expected = F.softmax(logits[:, [0, 2]], dim=1)
    assert torch.allclose(p[:, [0, 2]], expected)


def test_local_loss_logits_dispatch_and_refusal() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    counts = torch.tensor([4, 0, 4])
    assert torch.equal(local_loss_logits(logits, counts, TrainConfig()), logits)
    r = local_loss_logits(
        logits, counts, TrainConfig(local_loss="restricted", restricted_alpha=0.25)
    )
    assert torch.allclose(r, torch.tensor([[1.0, 0.5, 3.0]]))
    a = local_loss_logits(logits, counts, TrainConfig(local_loss="logit-adjusted"))
    assert torch.isneginf(a[0, 1])
    with pytest.raises(ValueError, match="local-loss"):
        local_loss_logits(logits, counts, TrainConfig(local_loss="focal"))


def test_restricted_new_restricts_only_the_grown_rows() -> None:
    """Rows >= distill-classes that the node lacks are scaled; absent old rows
    keep plain CE (a new-only node must still push them down); no growth window
    (distill-classes 0) means plain CE everywhere."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cfg = TrainConfig(local_loss="restricted-new", restricted_alpha=0.0)
    old_only = torch.tensor([5, 5, 0, 0])
    new_only = torch.tensor([0, 0, 5, 0])
    grown = TrainConfig(
        local_loss="restricted-new", restricted_alpha=0.0, distill_classes=2
    )
    assert torch.equal(local_loss_logits(logits, old_only, cfg), logits)
    assert torch.equal(
        local_loss_logits(logits, old_only, grown), torch.tensor([[1.0, 2.0, 0, 0]])
    )
    assert torch.equal(
        local_loss_logits(logits, new_only, grown),
        torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
    )


def test_run_config_validates_the_new_keys() -> None:
    cfg = RunConfig.from_flower({"local-loss": "restricted", "restricted-alpha": 0.0})
    assert cfg.local_loss == "restricted" and cfg.restricted_alpha == 0.0
    with pytest.raises(ConfigError, match="local-loss"):
        RunConfig(local_loss="masked")
    with pytest.raises(ConfigError, match="restricted-alpha"):
        RunConfig(restricted_alpha=1.5)
    with pytest.raises(ConfigError, match="logit-adjust-tau"):
        RunConfig(logit_adjust_tau=-1.0)


def _skewed_data(n: int = 64) -> LabelledTensors:
    """Images of classes 0 and 1 only, in a 4-class head (2 and 3 absent)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    images[labels == 1] //= 4  # something learnable: darker images are class 1
    return LabelledTensors(images, labels)


@pytest.mark.parametrize("loss", ["restricted", "logit-adjusted"])
def test_training_leaves_absent_head_rows_alone(loss: str) -> None:
    """With alpha = 0 (or logit adjustment), a node's steps never move the head
    rows of classes it does not hold (weight decay off to see it exactly)."""
    torch.manual_seed(0)
    args = ModelArgs("cnn", num_classes=4, norm="group")
    model = build_model(args)
    head_w, head_b = (model.state_dict()[k].clone() for k in _head(args))
    cfg = TrainConfig(
        weight_decay=0.0, local_loss=loss, restricted_alpha=0.0, batch_size=16
    )
    result = train(model, _skewed_data(), cfg)
    assert result.steps == 4
    w, b = (model.state_dict()[k] for k in _head(args))
    assert torch.equal(w[2:], head_w[2:]) and torch.equal(b[2:], head_b[2:])
    assert not torch.equal(w[:2], head_w[:2])  # the present rows did learn


def test_plain_cross_entropy_pushes_absent_rows() -> None:
    """The control: under "ce" the absent rows move (what the new losses avoid)."""
    torch.manual_seed(0)
    args = ModelArgs("cnn", num_classes=4, norm="group")
    model = build_model(args)
    head_b = model.state_dict()[_head(args)[1]].clone()
    train(model, _skewed_data(), TrainConfig(weight_decay=0.0, batch_size=16))
    b = model.state_dict()[_head(args)[1]]
    assert torch.all(b[2:] < head_b[2:])  # pushed down on every image


def _head(args: ModelArgs) -> tuple[str, str]:
    from fedobj.model.factory import head_keys

    return head_keys(args)
