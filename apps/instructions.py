"""What a round's messages tell the nodes, besides the model they carry.

Every train and evaluate message carries the class map and model arguments
(contract 2); a train message also carries the round's learning rate, what the
last growth asks for (distil the old classes) and the central-DP mode (nodes then
weigh their replies equally and clip where the mode says); an evaluate message
asks for feature statistics when the server calibrates the head. Written
in one place so that the strategy's Flower hooks only hand the result to the
inner strategy, as Flower's FedProx adds its ``proximal-mu`` in
``configure_train``.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord

from apps.growth import HeadGrowth
from apps.records import put_model_context
from fedobj import keys
from fedobj.calibration import CalibrationSettings


class RoundInstructions:
    """Builds each round's train and evaluate configs, and keeps the lr schedule.

    Parameters
    ----------
    growth
        The model's class map and architecture now, and the windows after its
        last growth.
    lr_fn
        The learning rate nodes use in a round (the schedule across rounds,
        counted from ``lr_phase_start``: a resumed run may continue another's).
    central_dp
        The run's ``central-dp`` mode (``"none"``: not sent).
    calibration
        Head calibration's settings; None when the server does not calibrate.
    evaluate_first
        Nodes score the model they receive before training and say so in the
        train reply (``evaluate-on-arrival``): no evaluate exchange.
    """

    def __init__(
        self,
        growth: HeadGrowth,
        lr_fn: Callable[[int], float],
        central_dp: str = "none",
        calibration: CalibrationSettings | None = None,
        evaluate_first: bool = False,
    ) -> None:
        self.growth = growth
        self.evaluate_first = evaluate_first
        self.lr_fn = lr_fn
        self.lr_phase_start = 1  # the round the schedule counts from
        self.central_dp = central_dp
        self.calibration = calibration

    def lr_at(self, server_round: int) -> float:
        """The round's learning rate, on the schedule from ``lr_phase_start``."""
        return self.lr_fn(server_round - self.lr_phase_start + 1)

    def train(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The round's train config: ``config`` plus what this round asks for."""
        config = ConfigRecord(dict(config))  # this round's own copy
        config[keys.LR] = self.lr_at(server_round)
        config[keys.DISTILL_CLASSES] = self.growth.distill_classes(server_round)
        if self.central_dp != "none":
            config[keys.CENTRAL_DP] = self.central_dp
        if self.evaluate_first:
            config[keys.EVALUATE_FIRST] = True
        return self.context(config)

    def evaluate(self, config: ConfigRecord) -> ConfigRecord:
        """The round's evaluate config: ``config`` plus, when the server
        calibrates the head, the request for feature statistics."""
        if self.calibration is not None:
            config = ConfigRecord(dict(config))
            config[keys.FEATURE_STATS] = True
        return self.context(config)

    def context(self, config: ConfigRecord) -> ConfigRecord:
        """A copy of ``config`` with the model's arguments and class map."""
        config = ConfigRecord(dict(config))  # messages never share later edits
        put_model_context(config, self.growth.model_args, self.growth.class_map)
        return config
