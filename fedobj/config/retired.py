"""Run-config keys that were retired, and the measurement each went on.

An option stays only while a measured setting shows it helping (or a deployment
needs it; STYLE.md rule 9). A run config that still names one of these fails
before round 1 with one line that says so, rather than being silently ignored
(``simulations/README.md`` holds the measurements quoted).
"""

from __future__ import annotations

from fedobj.errors import ConfigError

RETIRED: dict[str, str] = {
    "aggregation-weights": (
        "class-balanced weights measured without a gain in the disjoint setting; "
        "replies weigh their example counts"
    ),
    "augment": "random flips measured slower to 90% accuracy; nodes do not flip",
    "calibration-freeze-head": (
        "freezing the head on the nodes measured without a gain (0.818/0.799 "
        "against 0.809/0.799)"
    ),
    "calibration-lr": "never measured away from its value; it is 0.1",
    "calibration-samples": (
        "a longer fit (500 features, 300 steps: 0.813 against 0.809, one seed) "
        "was within the noise; 200 per class"
    ),
    "calibration-steps": (
        "a longer fit (500 features, 300 steps: 0.813 against 0.809, one seed) "
        "was within the noise; 100 steps"
    ),
    "distill-samples": (
        "distilling on old-class images only measured without a gain; nodes "
        "distil on every image"
    ),
    "distill-temperature": "never measured away from its value; it is 2",
    "head-align": (
        "its one gain (0.746, one seed) fell to 0.615 on a second seed: noise"
    ),
    "head-init": "only the old rows' mean was measured; new rows start there",
    "head-warmup-rounds": (
        "training the head alone after a growth measured without a gain "
        "(0.800/0.802 against 0.809/0.805)"
    ),
    "local-loss": (
        "no FedRS variant beat the noise and logit adjustment was never run; "
        "nodes train with cross-entropy"
    ),
    "logit-adjust-tau": "went with local-loss; nodes train with cross-entropy",
    "lr-decay": "went with lr-schedule; the schedule is cosine",
    "lr-restart-on-growth": (
        "restarting the schedule at a growth measured without a gain (with "
        "calibration 0.787 against 0.809)"
    ),
    "lr-schedule": "only the cosine schedule was measured; it is the schedule",
    "overlap-rounds": (
        "measured slower (23.3 against 22.6 s a round) and never where it helps"
    ),
    "restricted-alpha": "went with local-loss; nodes train with cross-entropy",
}
"""Retired key -> why, in a clause the refusal quotes."""


def refuse_retired(key: str) -> None:
    """Raise the one-line refusal for a retired ``key`` (nothing for others)."""
    if key in RETIRED:
        raise ConfigError(
            f"run config `{key}` was retired: {RETIRED[key]}; remove it "
            "(docs/configuration.md lists the keys)"
        )
