"""The privacy lines of a round, and central DP's refusal, alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from apps.privacy_log import CentralDpError, central_spend, log_node_spend, refuse
from apps.replies import NodeOutcome
from fedobj import keys


class Accountant:
    def get_privacy_spent(self) -> SimpleNamespace:
        return SimpleNamespace(
            epsilon=1.5, delta=1e-5, num_releases=4, accounting_method="rdp"
        )

    def state_dict(self) -> dict[str, int]:
        return {"events": 4}


def test_each_dp_sgd_node_says_its_spend(caplog: pytest.LogCaptureFixture) -> None:
    dp = {
        keys.DP_EPSILON: 0.75,
        keys.DP_DELTA: 1e-5,
        keys.DP_NOISE_MULTIPLIER: 1.1,
        keys.DP_SAMPLE_RATE: 0.01,
        keys.DP_STEPS: 30.0,
    }
    with caplog.at_level("INFO", logger="fedobj"):
        log_node_spend(
            3, [NodeOutcome(11, dp), NodeOutcome(12, {keys.NUM_EXAMPLES: 5})]
        )
    assert caplog.messages == [
        "round 3: node 11 DP epsilon 0.7500 (delta 1e-05; rdp accountant, noise "
        "multiplier 1.1, sample rate 0.01000, 30 steps this round)"
    ]


def test_central_dp_spend_is_returned_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrapper = SimpleNamespace(
        accountant=Accountant(),
        noise_multiplier=0.8,
        clipping_norm=2.0,
        num_sampled_clients=5,
    )
    with caplog.at_level("INFO", logger="fedobj"):
        spent = central_spend(2, wrapper, "server-fixed")  # type: ignore[arg-type]
        assert central_spend(2, wrapper, "none") is None  # type: ignore[arg-type]
    assert spent == {
        "epsilon": 1.5,
        "delta": 1e-5,
        "releases": 4,
        "accountant": "rdp",
        "noise_multiplier": 0.8,
        "clipping_norm": 2.0,
        "sampled_nodes": 5,
        "ledger": {"events": 4},
    }
    assert caplog.messages == [
        "round 2: central DP epsilon 1.5000 at delta 1e-05 after 4 releases (rdp "
        "accountant, noise multiplier 0.8, clipping norm 2, 5 nodes sampled, no "
        "amplification by sampling)"
    ]


def test_without_an_accountant_the_clipping_bound_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrapper = SimpleNamespace(noise_multiplier=0.8, clipping_norm=0.25)
    with caplog.at_level("INFO", logger="fedobj"):
        assert central_spend(6, wrapper, "server-adaptive") is None  # type: ignore[arg-type]
    assert caplog.messages == [
        "round 6: central DP (server-adaptive) clipping norm now 0.2500, noise "
        "multiplier 0.8; no accountant (central-dp-epsilon=0)"
    ]


def test_an_accountant_refusal_ends_a_central_dp_run_only() -> None:
    refuse(4, "none", ValueError("not ours"))  # the caller re-raises it
    with pytest.raises(CentralDpError, match="round 4: central DP accounting cannot"):
        refuse(4, "server-fixed", ValueError("sample size changed"))
