"""Property tests (hypothesis): head growth and PerfFedAvg weights."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedobj.aggregation import perf_fedavg_weights
from fedobj.model import ModelArgs, build_model
from fedobj.model.factory import head_keys
from fedobj.model.growth import HEAD_INITS, grow_head


@settings(max_examples=25, deadline=None)
@given(
    old_n=st.integers(1, 12),
    extra=st.integers(0, 8),
    init=st.sampled_from(HEAD_INITS),
    seed=st.integers(0, 2**31 - 1),
)
def test_grow_head_keeps_old_rows_and_old_logits(
    old_n: int, extra: int, init: str, seed: int
) -> None:
    args = ModelArgs("cnn", old_n)
    torch.manual_seed(seed)
    small = build_model(args).eval()
    state = {k: v.numpy() for k, v in small.state_dict().items()}
    grown = grow_head(state, head_keys(args), old_n, old_n + extra, init, seed)
    for k in head_keys(args):
        assert grown[k].shape[0] == old_n + extra
        np.testing.assert_array_equal(grown[k][:old_n], state[k])
        assert np.isfinite(grown[k]).all()
    big = build_model(args.with_classes(old_n + extra)).eval()
    big.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in grown.items()})
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        old_logits, new_logits = small(x), big(x)
    # with the new rows masked, the old classes' outputs are exactly the old model's
    torch.testing.assert_close(new_logits[:, :old_n], old_logits)
    assert torch.equal(new_logits[:, :old_n].argmax(1), old_logits.argmax(1))


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(1, 10_000), st.one_of(st.none(), st.floats(0.0, 1.0))),
        min_size=1,
        max_size=20,
    ),
    alpha=st.floats(0.0, 1.0),
)
def test_perf_fedavg_weights_sum_to_one_and_alpha_one_is_fedavg(
    data: list[tuple[int, float | None]], alpha: float
) -> None:
    n = [d[0] for d in data]
    acc = [d[1] for d in data]
    w = perf_fedavg_weights(n, acc, alpha)
    assert w.shape == (len(n),) and (w >= 0).all()
    assert abs(w.sum() - 1.0) < 1e-9
    fedavg = np.asarray(n, float) / sum(n)
    np.testing.assert_allclose(perf_fedavg_weights(n, acc, 1.0), fedavg, rtol=1e-12)
