"""The ``cnn``'s fast forward computes what its ``forward`` computes, gradients too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedobj.model import ModelArgs, build_model
from fedobj.model.factory import SmallCNN
from fedobj.model.fastpath import dropout, fast_forward


def _model(norm: str = "group", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelArgs("cnn", 10, 1, 28, norm))


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    named = model.named_parameters()
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [28, 32])
def test_fast_forward_matches_forward_and_backward(
    norm: str, channels_last: bool, size: int
) -> None:
    """Values and every parameter's gradient, train mode, both layouts, both sizes.

    32x32 input makes the adaptive pool a real pool (8x8 -> 7x7), 28x28 an identity
    that the fast path skips; BatchNorm (in train mode) checks the non-GroupNorm arm.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 1, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (16,))
    outs, grads = [], []
    for fast in (False, True):
        model = _model(norm).to(memory_format=fmt)
        _no_dropout(model)
        model.train()
        forward = fast_forward(model) if fast else model
        out = forward(x)
        nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append(_grads(model))
    assert fast_forward(model) is not model  # the fast path ran
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_fast_forward_in_eval_mode_is_deterministic_and_equal() -> None:
    model = _model().eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast_forward(model)(x), model(x))


def test_other_models_run_their_own_forward() -> None:
    class Subclassed(SmallCNN):
        pass

    changed = _model()
    assert isinstance(changed, SmallCNN)
    changed.hidden[1] = nn.Identity()  # a layout the fast path does not know
    mobilenet = build_model(ModelArgs("mobilenet_v3_small", 4, 3, 32, "group"))
    sub = Subclassed(ModelArgs())
    hooked = _model()
    hooked.hidden[3].register_forward_hook(lambda m, i, o: None)  # the hidden ReLU
    for model in (changed, mobilenet, sub, hooked):
        assert fast_forward(model) is model
    # a hook on a layer the fast path calls as a module keeps it (and fires)
    fired: list[int] = []
    conv_hooked = _model().eval()
    conv_hooked.features[0][0].register_forward_hook(lambda m, i, o: fired.append(1))
    forward = fast_forward(conv_hooked)
    assert forward is not conv_hooked
    forward(torch.randn(2, 1, 28, 28))
    assert fired == [1]


def test_dropout_keeps_one_minus_p_and_rescales() -> None:
    torch.manual_seed(1)
    x = torch.ones(200, 1000)
    out = dropout(x, 0.25, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 200,000 draws
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert dropout(x, 0.25, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert not dropout(x, 1.0, training=True).any()


def test_dropout_gradient_is_the_mask() -> None:
    x = torch.randn(50, 60, requires_grad=True)
    out = dropout(x, 0.5, training=True)
    out.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (out.detach() != 0).float() * 2.0)


@pytest.mark.parametrize("p1,p2", [(0.5, 0.0), (0.0, 0.5)])
def test_each_dropout_sits_where_the_module_puts_it(p1: float, p2: float) -> None:
    """The share of zeros reaching the hidden Linear and the classifier matches the
    module's own forward, dropout by dropout (a swapped or moved dropout would not)."""
    model = _model().train()
    model.hidden[1].p, model.hidden[4].p = p1, p2
    seen: dict[str, list[float]] = {"hidden": [], "classifier": []}

    def record(name: str):  # noqa: ANN202
        return lambda m, inputs, out: seen[name].append(
            float((inputs[0] == 0).float().mean())
        )

    model.hidden[2].register_forward_hook(record("hidden"))
    model.classifier.register_forward_hook(record("classifier"))
    x = torch.randn(256, 1, 28, 28)
    torch.manual_seed(3)
    with torch.no_grad():
        model(x)
        forward = fast_forward(model)
        assert forward is not model  # hooks on Linear layers keep the fast path
        forward(x)
    for name, (plain, fast) in seen.items():
        assert abs(plain - fast) < 0.02, (name, plain, fast)


@pytest.mark.parametrize(("channels", "groups"), [(32, 8), (16, 8), (12, 3), (6, 6)])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_group_norm_matches_pytorch_values_and_gradients(
    channels: int, groups: int, offset: float
) -> None:
    """The channel-wise GroupNorm against ``F.group_norm``: output and the
    gradients of input, weight and bias; a large common offset checks that the
    variance is taken around the mean (no E[x^2] - E[x]^2 cancellation)."""
    from fedobj.model.fastpath import group_norm

    torch.manual_seed(channels + groups)
    norm = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, channels, 9, 7) * 3 + offset
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(5, channels, 9, 7).contiguous(memory_format=torch.channels_last)
    got: list[torch.Tensor] = []
    for fn in (norm, lambda t: group_norm(t, norm)):
        xi = x.clone().requires_grad_()
        norm.zero_grad()
        y = fn(xi)
        y.backward(dy)
        assert xi.grad is not None and norm.weight.grad is not None
        assert norm.bias.grad is not None
        got += [y.detach(), xi.grad, norm.weight.grad.clone(), norm.bias.grad.clone()]
    want, mine = got[:4], got[4:]
    assert mine[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(want, mine, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_group_norm_fast_arm_only_where_it_is_faster() -> None:
    """Fewer than 8 channels a group, channels-last float32, no hook: the
    channel-wise arm; otherwise the module itself runs."""
    from fedobj.model import fastpath

    calls: list[str] = []
    real = fastpath.group_norm

    def spy(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        calls.append("fast")
        return real(x, norm)

    cl = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    small, wide = nn.GroupNorm(8, 32), nn.GroupNorm(4, 32)  # 4 and 8 per group
    try:
        fastpath.group_norm = spy  # type: ignore[assignment]
        fastpath._norm(small, cl)
        assert calls == ["fast"]
        fastpath._norm(small, cl.contiguous())  # NCHW
        fastpath._norm(wide, cl)
        fastpath._norm(small, cl.flatten(2))  # (N, C, L)
        small.register_forward_hook(lambda *_: None)
        fastpath._norm(small, cl)
        assert calls == ["fast"]
    finally:
        fastpath.group_norm = real  # type: ignore[assignment]


@pytest.mark.parametrize("batch", [1, 2])
def test_group_norm_small_batches_and_an_nchw_gradient(batch: int) -> None:
    """N=1 and 2 (a channels-last map that is not NCHW-contiguous too), and an
    incoming gradient in NCHW layout, still give PyTorch's values."""
    from fedobj.model.fastpath import group_norm

    torch.manual_seed(batch)
    norm = nn.GroupNorm(8, 32)
    x = torch.randn(batch, 32, 5, 4).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(batch, 32, 5, 4)  # NCHW
    got = []
    for fn in (norm, lambda t: group_norm(t, norm)):
        xi = x.clone().requires_grad_()
        norm.zero_grad()
        fn(xi).backward(dy)
        assert xi.grad is not None and norm.weight.grad is not None
        got.append((xi.grad, norm.weight.grad.clone()))
    for a, b in zip(got[0], got[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_fast_forward_in_eval_mode_channels_last_is_equal() -> None:
    """Evaluation runs under no_grad with channels-last input: the GroupNorm
    fast arm, nothing saved for a backward, PyTorch's values."""
    model = _model().eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(
            fast_forward(model)(x), model(x), rtol=1e-5, atol=1e-5
        )
    with torch.inference_mode():
        torch.testing.assert_close(
            fast_forward(model)(x), model(x), rtol=1e-5, atol=1e-5
        )


def test_a_backward_hook_on_the_group_norm_keeps_the_module() -> None:
    from fedobj.model import fastpath

    norm = nn.GroupNorm(8, 32)
    seen: list[int] = []
    norm.register_full_backward_hook(lambda *_: seen.append(1))  # type: ignore[arg-type,return-value]
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    fastpath._norm(norm, x.requires_grad_()).sum().backward()
    assert seen == [1]
