"""The run configuration: read once from Flower's run config into typed fields.

Defaults live in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (the SuperLink
rejects keys not declared there); this module validates the values and names the
offending key in one line, before any round starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedobj.data.partition import PARTITIONERS
from fedobj.errors import ConfigError
from fedobj.model.factory import MODEL_NAMES, NORMS
from fedobj.model.growth import HEAD_ALIGNS, HEAD_INITS
from fedobj.registry import resolve_registry_root
from fedobj.train import DP_GRAD_SAMPLE_MODES, LOCAL_LOSSES, lr_for_round

# "virtual-features": CCVR on the server each round (fedobj.calibration)
HEAD_CALIBRATIONS = ("none", "virtual-features")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "perffedavg")
AGGREGATION_WEIGHTS = ("examples", "class-balanced")
LR_SCHEDULES = ("constant", "exponential", "cosine")
SECAGG_MODULUS = 2**32
"""Flower's SecAgg+ mask modulus (its default and maximum; not configurable)."""
CENTRAL_DP_MODES = (
    "none",
    "server-fixed",
    "client-fixed",
    "server-adaptive",
    "client-adaptive",
)


@dataclass(frozen=True)
class RunConfig:
    """Typed view of ``context.run_config``; field ``x_y`` is config key ``x-y``."""

    num_server_rounds: int = 5
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.5
    min_nodes: int = 2
    model: str = "cnn"
    norm: str = "group"
    image_size: int = 28
    in_channels: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.03
    lr_schedule: str = "cosine"
    lr_schedule_rounds: int = 0
    lr_restart_on_growth: bool = False
    lr_decay: float = 0.95
    lr_min: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    perf_alpha: float = 0.5
    aggregation_weights: str = "examples"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_node: int = 2
    eval_fraction: float = 0.1
    seed: int = 42
    dataset_dir: str = ""
    outputs_dir: str = ""
    pretrained_path: str = ""
    client_threads: int = 1
    central_eval: bool = True
    round_timeout: float = 600.0
    database_url: str = ""
    registry_uri: str = ""
    initial_categories: int = 10
    head_init: str = "mean"
    head_align: str = "none"
    head_calibration: str = "none"
    calibration_samples: int = 200
    calibration_steps: int = 100
    calibration_lr: float = 0.1
    calibration_freeze_head: bool = False
    distill_weight: float = 1.0
    distill_rounds: int = 5
    head_warmup_rounds: int = 0
    distill_temperature: float = 2.0
    distill_samples: str = "all"
    local_loss: str = "ce"
    restricted_alpha: float = 0.5
    logit_adjust_tau: float = 1.0
    class_split: str = "none"
    new_node_fraction: float = 0.3
    split_first_new: int = 0
    promote: str = "latest"
    dp: bool = False
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_grad_sample_mode: str = "auto"
    central_dp: str = "none"
    central_dp_noise_multiplier: float = 1.0
    central_dp_clipping_norm: float = 1.0
    central_dp_target_quantile: float = 0.5
    central_dp_clip_lr: float = 0.2
    central_dp_epsilon: float = 0.0
    central_dp_delta: float = 1e-5
    resume: bool = False
    overlap_rounds: bool = False
    dispatch_stagger: float = 0.0
    allow_concurrent_runs: bool = False
    lease_ttl: float = 1800.0
    secagg: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4_194_304
    secagg_max_weight: float = 100_000.0

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                value = getattr(self, key.replace("-", "_"))
                raise ConfigError(f"run config `{key}` {rule}, got {value!r}")

        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
        need(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
        need(0 < self.fraction_evaluate <= 1, "fraction-evaluate", "must be in (0, 1]")
        need(self.min_nodes >= 1, "min-nodes", "must be >= 1")
        need(self.model in MODEL_NAMES, "model", f"must be one of {MODEL_NAMES}")
        need(self.norm in NORMS, "norm", f"must be one of {NORMS}")
        need(self.in_channels in (1, 3), "in-channels", "must be 1 or 3")
        need(self.image_size >= 16, "image-size", "must be >= 16")
        need(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        need(self.batch_size >= 2, "batch-size", "must be >= 2")
        need(self.lr > 0, "lr", "must be > 0")
        need(
            self.lr_schedule in LR_SCHEDULES,
            "lr-schedule",
            f"must be one of {LR_SCHEDULES}",
        )
        need(self.lr_schedule_rounds >= 0, "lr-schedule-rounds", "must be >= 0")
        need(0 < self.lr_decay <= 1, "lr-decay", "must be in (0, 1]")
        need(0 <= self.lr_min <= self.lr, "lr-min", "must be in [0, lr]")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight-decay", "must be >= 0")
        need(self.proximal_mu >= 0, "proximal-mu", "must be >= 0")
        need(self.server_lr > 0, "server-lr", "must be > 0")
        need(0 <= self.perf_alpha <= 1, "perf-alpha", "must be in [0, 1]")
        need(
            self.partitioner in PARTITIONERS,
            "partitioner",
            f"must be one of {PARTITIONERS}",
        )
        need(self.dirichlet_alpha > 0, "dirichlet-alpha", "must be > 0")
        need(self.classes_per_node >= 1, "classes-per-node", "must be >= 1")
        need(0 <= self.eval_fraction < 1, "eval-fraction", "must be in [0, 1)")
        need(self.client_threads >= 1, "client-threads", "must be >= 1")
        need(self.round_timeout > 0, "round-timeout", "must be > 0")
        need(
            0 <= self.initial_categories <= 10,
            "initial-categories",
            "must be in 0..10 (Fashion-MNIST names seeded into an empty catalog)",
        )
        need(self.head_init in HEAD_INITS, "head-init", f"must be one of {HEAD_INITS}")
        need(
            self.head_align in HEAD_ALIGNS,
            "head-align",
            f"must be one of {HEAD_ALIGNS}",
        )
        need(self.promote in ("latest", "best"), "promote", "must be latest or best")
        need(self.distill_weight >= 0, "distill-weight", "must be >= 0")
        need(self.distill_rounds >= 0, "distill-rounds", "must be >= 0")
        need(self.head_warmup_rounds >= 0, "head-warmup-rounds", "must be >= 0")
        need(
            not (self.head_warmup_rounds and self.dp),
            "head-warmup-rounds",
            "is not available with dp (DP-SGD trains every parameter)",
        )
        need(self.distill_temperature > 0, "distill-temperature", "must be > 0")
        need(
            self.distill_samples in ("all", "old"),
            "distill-samples",
            "must be all or old",
        )
        need(
            self.local_loss in LOCAL_LOSSES,
            "local-loss",
            f"must be one of {LOCAL_LOSSES}",
        )
        need(0 <= self.restricted_alpha <= 1, "restricted-alpha", "must be in [0, 1]")
        need(self.logit_adjust_tau >= 0, "logit-adjust-tau", "must be >= 0")
        need(
            self.class_split in ("none", "disjoint"),
            "class-split",
            "must be none or disjoint",
        )
        need(0 < self.new_node_fraction < 1, "new-node-fraction", "must be in (0, 1)")
        need(
            0 <= self.split_first_new <= 9,
            "split-first-new",
            "must be 0 (= initial-categories) or a class from 1 to 9",
        )
        need(self.lease_ttl > 0, "lease-ttl", "must be > 0")
        need(
            0 <= self.dispatch_stagger <= 1,
            "dispatch-stagger",
            "must be between 0 (off) and 1 second",
        )
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
            not (self.dp and self.strategy == "fedprox"),
            "strategy",
            "cannot be fedprox with dp=true (DP-SGD clips per-sample gradients; "
            "the proximal term would bypass the clipping)",
        )
        self._check_central_dp(need)
        self._check_secagg(need)
        self._check_calibration(need)
        self._check_aggregation_weights(need)
        for key in ("dataset-dir", "outputs-dir", "pretrained-path"):
            value = getattr(self, key.replace("-", "_"))
            need(
                not value or Path(value).is_absolute(),
                key,
                "must be an absolute path (nodes and the ServerApp run elsewhere)",
            )

    def _check_aggregation_weights(
        self, need: Callable[[bool, str, str], None]
    ) -> None:
        need(
            self.aggregation_weights in AGGREGATION_WEIGHTS,
            "aggregation-weights",
            f"must be one of {AGGREGATION_WEIGHTS}",
        )
        if self.aggregation_weights == "class-balanced":
            # the weights come from the label histograms of replies folded as
            # they arrive: FedAdam and the DP/SecAgg+ paths have neither
            need(
                self.strategy in ("fedavg", "fedprox", "perffedavg"),
                "strategy",
                "must be fedavg, fedprox or perffedavg with "
                'aggregation-weights="class-balanced"',
            )
            need(
                self.central_dp == "none" and not self.secagg and not self.dp,
                "aggregation-weights",
                'cannot be "class-balanced" with dp, central-dp or secagg (it '
                "weighs replies by their label histograms, which those withhold "
                "or aggregate elsewhere)",
            )

    def _check_calibration(self, need: Callable[[bool, str, str], None]) -> None:
        need(
            self.head_calibration in HEAD_CALIBRATIONS,
            "head-calibration",
            f"must be one of {HEAD_CALIBRATIONS}",
        )
        need(self.calibration_samples >= 1, "calibration-samples", "must be >= 1")
        need(self.calibration_steps >= 1, "calibration-steps", "must be >= 1")
        need(self.calibration_lr > 0, "calibration-lr", "must be > 0")
        need(
            not self.calibration_freeze_head or self.head_calibration != "none",
            "calibration-freeze-head",
            "needs head-calibration (else the head never trains)",
        )
        if self.head_calibration != "none":
            # a class whose nodes all sat out the evaluation would have no
            # statistics, and the others' rows would be fitted without it
            need(
                self.fraction_evaluate == 1.0,
                "fraction-evaluate",
                "must be 1.0 with head-calibration (statistics from every node)",
            )
            # nodes would send per-class feature statistics in the clear
            need(
                not self.dp and self.central_dp == "none" and not self.secagg,
                "head-calibration",
                "cannot be used with dp, central-dp or secagg (nodes send "
                "per-class feature statistics in the clear)",
            )

    def _check_central_dp(self, need: Callable[[bool, str, str], None]) -> None:
        """Central DP settings, and the combinations Flower's wrappers cannot hold."""
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
        if self.central_dp == "none":
            return
        need(
            self.strategy != "perffedavg",
            "strategy",
            "cannot be perffedavg with central-dp (central DP bounds each node's "
            "share of an equal-weight mean; PerfFedAvg weighs nodes by accuracy)",
        )
        if self.central_dp_epsilon > 0:
            need(
                self.central_dp.endswith("-fixed"),
                "central-dp",
                "must be server-fixed or client-fixed with central-dp-epsilon > 0 "
                "(Flower's privacy accountant covers fixed clipping only)",
            )
            need(
                self.strategy in ("fedavg", "fedprox"),
                "strategy",
                "must be fedavg or fedprox with central-dp-epsilon > 0 (Flower's "
                "accountant needs FedAvg's aggregation)",
            )
            need(
                self.central_dp_noise_multiplier > 0,
                "central-dp-noise-multiplier",
                "must be > 0 with central-dp-epsilon > 0",
            )

    def _check_secagg(self, need: Callable[[bool, str, str], None]) -> None:
        """SecAgg+ settings (apps/secagg.py explains the arithmetic) and the
        combinations its legacy workflow cannot hold."""
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
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
        if not self.secagg:
            return
        max_nodes = (SECAGG_MODULUS - 1) // self.secagg_quantization_range
        need(
            self.min_nodes >= 3,
            "min-nodes",
            "must be >= 3 with secagg=true (with two, each node learns the "
            "other's update from the mean it is sent next round)",
        )
        need(
            self.min_nodes <= max_nodes,
            "min-nodes",
            f"must be <= {max_nodes} with secagg-quantization-range "
            f"{self.secagg_quantization_range}: the sum of that many quantised "
            "updates would overflow the 2**32 modulus",
        )
        need(
            shares <= 1 or shares <= self.min_nodes,
            "secagg-num-shares",
            "as a count must be <= min-nodes",
        )
        need(
            self.strategy == "fedavg",
            "strategy",
            "must be fedavg with secagg=true (the server sees only the weighted "
            "sum: no PerfFedAvg/FedProx/FedAdam on Flower's SecAgg+ workflow)",
        )
        need(
            not self.dp,
            "dp",
            "cannot be true with secagg=true (not wired on the legacy workflow)",
        )
        need(
            self.central_dp == "none",
            "central-dp",
            "must be none with secagg=true (Flower's DP wrappers need each update)",
        )
        need(
            self.norm != "batch",
            "norm",
            "cannot be batch with secagg=true (BatchNorm's counters and running "
            "variances are unbounded: they do not fit a clipping range)",
        )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config; unknown keys are ignored (Flower checks)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                continue
            value = run_config[key]
            default = f.default
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                    kwargs[f.name] = value
                elif isinstance(default, int):
                    if isinstance(value, bool) or int(value) != value:
                        raise TypeError
                    kwargs[f.name] = int(value)
                elif isinstance(default, float):
                    if isinstance(value, bool):
                        raise TypeError
                    kwargs[f.name] = float(value)
                else:
                    kwargs[f.name] = str(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"run config `{key}` must be {type(default).__name__}, "
                    f"got {value!r}"
                ) from None
        return cls(**kwargs)

    @property
    def data_split(self) -> tuple[int, float] | None:
        """For ``class-split=disjoint``: (first new class, share of new-only nodes).

        The first new class is ``split-first-new``, or ``initial-categories`` when 0.
        A joint-training baseline (all 10 categories from round 1) sets it to the
        growing runs' split so that it trains on the same nodes' same images: split
        at ``initial-categories=10``, its new-only nodes would hold nothing and the
        others every category, an easier federation than the one it is compared to.
        """
        if self.class_split != "disjoint":
            return None
        return self.split_first_new or self.initial_categories, self.new_node_fraction

    def lr_at(self, server_round: int) -> float:
        """The learning rate nodes use in ``server_round``."""
        horizon = self.lr_schedule_rounds or self.num_server_rounds
        return lr_for_round(
            self.lr, self.lr_schedule, server_round, horizon, self.lr_decay, self.lr_min
        )

    def to_flower(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def resolve_outputs_dir(self) -> Path:
        """Absolute outputs root: run config, then FEDOBJ_OUTPUTS_DIR, then ./outputs.

        ``flwr run`` executes the ServerApp in another process whose working directory
        is that of the SuperLink; the Makefile starts the SuperLink in the project
        folder, so ``./outputs`` lands there. The resolved path is always logged.
        """
        if self.outputs_dir:
            return Path(self.outputs_dir)
        env = os.environ.get("FEDOBJ_OUTPUTS_DIR")
        return Path(env).resolve() if env else (Path.cwd() / "outputs").resolve()

    def resolve_registry_uri(self, outputs_root: Path) -> str:
        """The registry root: run-config ``registry-uri``, then FEDOBJ_REGISTRY_URI
        (read from the SuperLink's environment, which the ServerApp inherits), then
        ``outputs_root`` — :func:`fedobj.registry.resolve_registry_root`, the rule
        the CLI and the admin API follow too."""
        return resolve_registry_root(self.registry_uri, outputs_root)
