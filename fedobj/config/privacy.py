"""The run config's privacy sections: DP-SGD on the devices, central DP on the
server (Flower's wrappers), and secure aggregation (SecAgg+).

Each section checks its own ranges; which of them a strategy, a norm or the other
section can be combined with is decided in :mod:`fedobj.config.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedobj.config.options import Need, Section, option
from fedobj.config.sections import one_of
from fedobj.train import DP_GRAD_SAMPLE_MODES

CENTRAL_DP_MODES = (
    "none",
    "server-fixed",
    "client-fixed",
    "server-adaptive",
    "client-adaptive",
)
SECAGG_MODULUS = 2**32
"""Flower's SecAgg+ mask modulus (its default and maximum; not configurable)."""


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Differential privacy: per device (DP-SGD, ``dp-*``) and per node's update
    in the published models (``central-dp-*``)."""

    NAME = "privacy"
    TITLE = "Differential privacy"

    dp: bool = option(
        False, "DP-SGD (Opacus) on every device, within a budget kept on its own disk"
    )
    dp_epsilon: float = option(
        8.0, "a device's whole budget; it declines rounds that would exceed it", "> 0"
    )
    dp_delta: float = option(1e-5, "the delta epsilon is accounted at", "(0, 1)")
    dp_max_grad_norm: float = option(1.0, "per-sample gradient clipping bound", "> 0")
    dp_noise_multiplier: float = option(
        1.0, "Gaussian noise std over the clipping bound", "> 0"
    )
    dp_grad_sample_mode: str = option(
        "auto",
        "how per-sample gradients are clipped (same clipping and noise); auto: bk "
        "(one backward pass) where it can clip the model, else ghost",
        one_of(DP_GRAD_SAMPLE_MODES),
    )
    central_dp: str = option(
        "none",
        "Flower's central-DP wrapper: each node's update clipped, equal weights, "
        "noise on the mean",
        one_of(CENTRAL_DP_MODES),
    )
    central_dp_noise_multiplier: float = option(
        1.0, "noise std on the mean = this x clipping norm / sampled nodes", ">= 0"
    )
    central_dp_clipping_norm: float = option(
        1.0, "L2 bound on each node's update (adaptive: where it starts)", "> 0"
    )
    central_dp_target_quantile: float = option(
        0.5, "adaptive: share of updates left unclipped", "[0, 1]"
    )
    central_dp_clip_lr: float = option(
        0.2, "adaptive: how fast the bound follows that quantile", "> 0"
    )
    central_dp_epsilon: float = option(
        0.0, "> 0: Flower's RDP accountant; the run stops before exceeding it", ">= 0"
    )
    central_dp_delta: float = option(1e-5, "the accountant's delta", "(0, 1)")

    @property
    def private_updates(self) -> bool:
        """Whether nodes' updates are private (DP-SGD or central DP)."""
        return self.dp or self.central_dp != "none"

    def check(self, need: Need) -> None:
        need(self.dp_epsilon > 0, "dp-epsilon", "must be > 0")
        need(0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)")
        need(self.dp_max_grad_norm > 0, "dp-max-grad-norm", "must be > 0")
        need(self.dp_noise_multiplier > 0, "dp-noise-multiplier", "must be > 0")
        need(
            self.dp_grad_sample_mode in DP_GRAD_SAMPLE_MODES,
            "dp-grad-sample-mode",
            f"must be one of {DP_GRAD_SAMPLE_MODES}",
        )
        need(
            self.central_dp in CENTRAL_DP_MODES,
            "central-dp",
            f"must be one of {CENTRAL_DP_MODES}",
        )
        need(
            self.central_dp_noise_multiplier >= 0,
            "central-dp-noise-multiplier",
            "must be >= 0",
        )
        need(
            self.central_dp_clipping_norm > 0, "central-dp-clipping-norm", "must be > 0"
        )
        need(
            0 <= self.central_dp_target_quantile <= 1,
            "central-dp-target-quantile",
            "must be in [0, 1]",
        )
        need(self.central_dp_clip_lr > 0, "central-dp-clip-lr", "must be > 0")
        need(self.central_dp_epsilon >= 0, "central-dp-epsilon", "must be >= 0")
        need(0 < self.central_dp_delta < 1, "central-dp-delta", "must be in (0, 1)")
        if self.central_dp != "none" and self.central_dp_epsilon > 0:
            need(
                self.central_dp.endswith("-fixed"),
                "central-dp",
                "must be server-fixed or client-fixed with central-dp-epsilon > 0 "
                "(Flower's privacy accountant covers fixed clipping only)",
            )
            need(
                self.central_dp_noise_multiplier > 0,
                "central-dp-noise-multiplier",
                "must be > 0 with central-dp-epsilon > 0",
            )


@dataclass(frozen=True)
class SecAggConfig(Section):
    """SecAgg+ (Flower's legacy workflow); ``apps/secagg.py`` explains the
    arithmetic of the quantisation keys."""

    NAME = "secagg"
    TITLE = "Secure aggregation (SecAgg+)"

    secagg: bool = option(
        False, "SecAgg+: the server sees only the weighted sum of updates; fedavg only"
    )
    secagg_num_shares: float = option(
        1.0,
        "<= 1: share of the sampled nodes each key is split among; > 1: a count "
        "(odd, >= 3)",
    )
    secagg_reconstruction_threshold: float = option(
        0.67, "<= 1: share of the shares needed to unmask; > 1: a count"
    )
    secagg_clipping_range: float = option(
        8.0, "every weight must lie in [-this, this]; quantisation error grows", "> 0"
    )
    secagg_quantization_range: int = option(
        4_194_304, "levels per value; sampled nodes x this < 2**32", "[2, 2**31)"
    )
    secagg_max_weight: float = option(
        100_000.0,
        "examples that fill the range; more count as this many (smaller: precise)",
        "(0, secagg-quantization-range]",
    )

    @property
    def max_nodes(self) -> int:
        """The most sampled nodes whose quantised sum stays below the modulus."""
        return (SECAGG_MODULUS - 1) // self.secagg_quantization_range

    def check(self, need: Need) -> None:
        shares = self.secagg_num_shares
        threshold = self.secagg_reconstruction_threshold
        need(
            0 < shares <= 1 or (shares == int(shares) and shares >= 3),
            "secagg-num-shares",
            "must be a share of the sampled nodes in (0, 1] or a count >= 3",
        )
        need(
            0 < threshold <= 1 or (threshold == int(threshold) and threshold >= 2),
            "secagg-reconstruction-threshold",
            "must be a share of secagg-num-shares in (0, 1] or a count >= 2",
        )
        need(
            not (shares > 1 and threshold > 1 and threshold >= shares),
            "secagg-reconstruction-threshold",
            "must be below secagg-num-shares",
        )
        need(self.secagg_clipping_range > 0, "secagg-clipping-range", "must be > 0")
        need(
            2 <= self.secagg_quantization_range < 2**31,
            "secagg-quantization-range",
            "must be in [2, 2**31) (Flower rounds quantised values to int32)",
        )
        need(
            0 < self.secagg_max_weight <= self.secagg_quantization_range,
            "secagg-max-weight",
            "must be in (0, secagg-quantization-range] (one example must move "
            "the quantised weight by at least one step)",
        )
