"""The run configuration, grouped by concern (``docs/configuration.md``).

Flower's run config stays flat and hyphenated (``dp-epsilon``); in code it is a
:class:`RunConfig` of typed sections (``cfg.privacy.dp_epsilon``), built and
validated once by :meth:`RunConfig.from_flower`:

- :mod:`~fedobj.config.options`: how a key is declared (default, one line, type);
- :mod:`~fedobj.config.sections`: training, model, growth, evaluation,
  simulation, deployment;
- :mod:`~fedobj.config.privacy`: DP-SGD, central DP, SecAgg+;
- :mod:`~fedobj.config.link`: compressed updates and models (the edge link);
- :mod:`~fedobj.config.retired`: keys that went, and why;
- :mod:`~fedobj.config.run`: the whole, its combinations, and key checks.
"""

from fedobj.config.link import LinkConfig
from fedobj.config.privacy import (
    CENTRAL_DP_MODES,
    SECAGG_MODULUS,
    PrivacyConfig,
    SecAggConfig,
)
from fedobj.config.retired import RETIRED
from fedobj.config.run import KEYS, SECTIONS, RunConfig, check_keys, parse_overrides
from fedobj.config.sections import (
    HEAD_CALIBRATIONS,
    STRATEGIES,
    DeploymentConfig,
    EvaluationConfig,
    GrowthConfig,
    ModelConfig,
    SimulationConfig,
    TrainingConfig,
)

__all__ = [
    "CENTRAL_DP_MODES",
    "HEAD_CALIBRATIONS",
    "KEYS",
    "LinkConfig",
    "RETIRED",
    "SECAGG_MODULUS",
    "SECTIONS",
    "STRATEGIES",
    "DeploymentConfig",
    "EvaluationConfig",
    "GrowthConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "SimulationConfig",
    "TrainingConfig",
    "check_keys",
    "parse_overrides",
]
