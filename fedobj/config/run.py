"""The run configuration: Flower's flat run config, read once into typed sections.

``RunConfig.from_flower(context.run_config)`` is the only way the apps read it:
every key is known (a retired or misspelt key is refused, never ignored), every
value has its section's type and range, and combinations that cannot run
together are refused here, naming the key, before any round starts.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedobj.config.link import LinkConfig
from fedobj.config.options import Section, coerce, key_of
from fedobj.config.privacy import PrivacyConfig, SecAggConfig
from fedobj.config.retired import refuse_retired
from fedobj.config.sections import (
    DeploymentConfig,
    EvaluationConfig,
    GrowthConfig,
    ModelConfig,
    SimulationConfig,
    TrainingConfig,
)
from fedobj.errors import ConfigError
from fedobj.registry import resolve_registry_root
from fedobj.train import lr_for_round

SECTIONS: tuple[type[Section], ...] = (
    TrainingConfig,
    ModelConfig,
    GrowthConfig,
    EvaluationConfig,
    SimulationConfig,
    PrivacyConfig,
    SecAggConfig,
    LinkConfig,
    DeploymentConfig,
)
"""Every section, in the order the reference lists them."""

KEYS: dict[str, tuple[type[Section], str]] = {
    key_of(f.name): (section, f.name) for section in SECTIONS for f in section.fields()
}
"""Every run-config key -> its section and field name."""


def check_keys(keys: Iterable[str]) -> None:
    """Refuse a retired or unknown key with one line that names it."""
    for key in keys:
        refuse_retired(key)
        if key not in KEYS:
            raise ConfigError(
                f"run config `{key}` is not a key of this app "
                "(docs/configuration.md lists them)"
            )


_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""A ``key=value`` pair as ``flwr run --run-config`` reads it."""


def parse_overrides(text: str) -> dict[str, Any]:
    """The keys and values of a ``--run-config`` argument, read as Flower reads
    it: a ``.toml`` file (nested tables joined with ``.``) or ``key=value``
    pairs with TOML values; for checking keys before a run is submitted."""
    if text.strip().endswith(".toml"):
        path = Path(text.strip()).expanduser()
        try:
            loaded = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"run config file {path}: {exc}") from None
        return _flatten(loaded)
    toml = "\n".join(f"{k} = {v}" for k, v in _PAIR.findall(text))
    try:
        return _flatten(tomllib.loads(toml))
    except tomllib.TOMLDecodeError as exc:
        why = f"run config {text!r} is not key=value pairs: {exc}"
        raise ConfigError(why) from None


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class RunConfig:
    """Typed view of ``context.run_config``: one section per concern.

    A section's field ``x_y`` is the key ``x-y``: ``cfg.privacy.dp_epsilon`` is
    ``dp-epsilon``. Build it with :meth:`from_flower`; one built by hand
    (``RunConfig(privacy=PrivacyConfig(dp=True))``) is validated the same way.
    """

    training: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def __post_init__(self) -> None:
        self._check_dp()
        self._check_secagg()
        self._check_evaluation()

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (or part of it: absent keys keep their
        defaults); a retired or unknown key is refused, never ignored."""
        check_keys(run_config)
        kwargs: dict[str, dict[str, Any]] = {s.NAME: {} for s in SECTIONS}
        for key, value in run_config.items():
            section, name = KEYS[key]
            kwargs[section.NAME][name] = coerce(key, section.default_of(name), value)
        sections: dict[str, Any] = {s.NAME: s(**kwargs[s.NAME]) for s in SECTIONS}
        return cls(**sections)

    def to_flower(self) -> dict[str, Any]:
        """Every key and value, flat, as Flower spells them (provenance, runs)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            out.update(getattr(self, section.NAME).to_flower())
        return out

    def value(self, key: str) -> Any:
        """The value of one run-config key, from whichever section holds it."""
        section, name = KEYS[key]
        return getattr(getattr(self, section.NAME), name)

    def _need(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"run config `{key}` {rule}, got {self.value(key)!r}")

    # ------------------------------------------------------------ combinations

    def _check_dp(self) -> None:
        """What DP-SGD and Flower's central-DP wrappers cannot be combined with."""
        need, strategy, priv = self._need, self.training.strategy, self.privacy
        need(
            not (priv.dp and strategy == "fedprox"),
            "strategy",
            "cannot be fedprox with dp=true (DP-SGD clips per-sample gradients; "
            "the proximal term would bypass the clipping)",
        )
        if priv.central_dp == "none":
            return
        need(
            strategy != "perffedavg",
            "strategy",
            "cannot be perffedavg with central-dp (central DP bounds each node's "
            "share of an equal-weight mean; PerfFedAvg weighs nodes by accuracy)",
        )
        if priv.central_dp_epsilon > 0:
            need(
                strategy in ("fedavg", "fedprox"),
                "strategy",
                "must be fedavg or fedprox with central-dp-epsilon > 0 (Flower's "
                "accountant needs FedAvg's aggregation)",
            )

    def _check_secagg(self) -> None:
        """SecAgg+'s legacy workflow sees only the weighted sum of the updates."""
        if not self.secagg.secagg:
            return
        need, sec, min_nodes = self._need, self.secagg, self.training.min_nodes
        need(
            min_nodes >= 3,
            "min-nodes",
            "must be >= 3 with secagg=true (with two, each node learns the "
            "other's update from the mean it is sent next round)",
        )
        need(
            min_nodes <= sec.max_nodes,
            "min-nodes",
            f"must be <= {sec.max_nodes} with secagg-quantization-range "
            f"{sec.secagg_quantization_range}: the sum of that many quantised "
            "updates would overflow the 2**32 modulus",
        )
        need(
            sec.secagg_num_shares <= 1 or sec.secagg_num_shares <= min_nodes,
            "secagg-num-shares",
            "as a count must be <= min-nodes",
        )
        need(
            self.training.strategy == "fedavg",
            "strategy",
            "must be fedavg with secagg=true (the server sees only the weighted "
            "sum: no PerfFedAvg/FedProx/FedAdam on Flower's SecAgg+ workflow)",
        )
        need(
            not self.privacy.dp,
            "dp",
            "cannot be true with secagg=true (not wired on the legacy workflow)",
        )
        need(
            self.privacy.central_dp == "none",
            "central-dp",
            "must be none with secagg=true (Flower's DP wrappers need each update)",
        )
        need(
            self.model.norm != "batch",
            "norm",
            "cannot be batch with secagg=true (BatchNorm's counters and running "
            "variances are unbounded: they do not fit a clipping range)",
        )
        need(
            self.link.update_compression == "none",
            "update-compression",
            "must be none with secagg=true (SecAgg+ masks dense integer vectors: "
            "a compressed update cannot be masked and summed)",
        )
        need(
            self.link.downlink_compression == "none",
            "downlink-compression",
            "must be none with secagg=true (Flower's SecAgg+ workflow sends the "
            "model itself)",
        )

    def _check_evaluation(self) -> None:
        """Head calibration reads every node's feature statistics in the clear;
        an evaluation folder is for the server's evaluation."""
        need = self._need
        if self.growth.head_calibration != "none":
            # a class whose nodes all sat out the evaluation would have no
            # statistics, and the others' rows would be fitted without it
            need(
                self.evaluation.fraction_evaluate == 1.0,
                "fraction-evaluate",
                "must be 1.0 with head-calibration (statistics from every node)",
            )
            need(
                not self.evaluation.evaluate_on_arrival,
                "evaluate-on-arrival",
                "cannot be true with head-calibration (the calibration needs the "
                "evaluate exchange's feature statistics of the round's model)",
            )
            need(
                not self.privacy.private_updates and not self.secagg.secagg,
                "head-calibration",
                "cannot be used with dp, central-dp or secagg (nodes send "
                "per-class feature statistics in the clear)",
            )
        need(
            self.evaluation.central_eval or not self.evaluation.central_eval_dir,
            "central-eval",
            "must be true with central-eval-dir (the folder is for the server's "
            "evaluation)",
        )

    # ------------------------------------------------------------ derived values

    @property
    def data_split(self) -> tuple[int, float] | None:
        """For ``class-split=disjoint``: (first new class, share of new-only nodes).

        The first new class is ``split-first-new``, or ``initial-categories`` when 0.
        A joint-training baseline (all 10 categories from round 1) sets it to the
        growing runs' split so that it trains on the same nodes' same images: split
        at ``initial-categories=10``, its new-only nodes would hold nothing and the
        others every category, an easier federation than the one it is compared to.
        """
        sim = self.simulation
        if sim.class_split != "disjoint":
            return None
        first = sim.split_first_new or self.growth.initial_categories
        return first, sim.new_node_fraction

    def lr_at(self, server_round: int) -> float:
        """The learning rate nodes use in ``server_round`` (cosine to ``lr-min``)."""
        t = self.training
        horizon = t.lr_schedule_rounds or t.num_server_rounds
        return lr_for_round(t.lr, server_round, horizon, t.lr_min)

    def resolve_outputs_dir(self) -> Path:
        """Absolute outputs root: run config, then FEDOBJ_OUTPUTS_DIR, then ./outputs.

        ``flwr run`` executes the ServerApp in another process whose working directory
        is that of the SuperLink; the Makefile starts the SuperLink in the project
        folder, so ``./outputs`` lands there. The resolved path is always logged.
        """
        if self.deployment.outputs_dir:
            return Path(self.deployment.outputs_dir)
        env = os.environ.get("FEDOBJ_OUTPUTS_DIR")
        return Path(env).resolve() if env else (Path.cwd() / "outputs").resolve()

    def resolve_registry_uri(self, outputs_root: Path) -> str:
        """The registry root: run-config ``registry-uri``, then FEDOBJ_REGISTRY_URI
        (read from the SuperLink's environment, which the ServerApp inherits), then
        ``outputs_root`` — :func:`fedobj.registry.resolve_registry_root`, the rule
        the CLI and the admin API follow too."""
        return resolve_registry_root(self.deployment.registry_uri, outputs_root)
