"""Head calibration after aggregation (CCVR), fed by the evaluate replies.

With non-IID nodes the aggregated head is biased towards the classes most nodes
hold. The evaluate exchange already runs the round's aggregate on every node, so
nodes asked for it (``feature-stats``) send per-class statistics of its features;
:class:`HeadCalibrator` sums them and retrains the head on virtual features drawn
from them (``fedobj.calibration``), leaving the feature extractor as aggregated.

It reads Flower messages and records (the statistics come in a reply's
``ArrayRecord``); the maths is Flower-free in ``fedobj.calibration``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message

from apps.growth import array_record, numpy_arrays
from fedobj import keys
from fedobj.aggregation import array_view
from fedobj.calibration import CalibrationSettings, StatsSum, calibrate_head

# the round's lines, wherever the step that writes them lives
log = logging.getLogger("fedobj.strategy")


class HeadCalibrator:
    """Sums the nodes' feature statistics and calibrates the head on them.

    Parameters
    ----------
    settings
        Virtual features per class, SGD steps and learning rate.
    seed
        With the round, seeds the virtual features (a resume draws the same).
    """

    def __init__(self, settings: CalibrationSettings, seed: int = 0) -> None:
        self.settings = settings
        self.seed = seed

    def feature_stats(
        self, replies: Iterable[Message], arrays: ArrayRecord, heads: tuple[str, str]
    ) -> StatsSum:
        """Sum the evaluate replies' feature statistics for the head of
        ``arrays`` (``heads``: its weight and bias names).

        The records are taken out of the replies (Flower's aggregation expects
        none). A malformed set is logged and left out.
        """
        stats = StatsSum(*arrays[heads[0]].shape)
        for msg in replies:
            if msg.has_error():
                continue
            record = msg.content.array_records.get(keys.FEATURE_STATS_ARRAYS)
            if record is None:
                continue  # a node with no training image in the catalog's classes
            del msg.content[keys.FEATURE_STATS_ARRAYS]
            reason = stats.add({k: array_view(v) for k, v in record.items()})
            if reason is not None:
                log.warning(
                    "feature statistics of node %d left out: %s",
                    msg.metadata.src_node_id,
                    reason,
                )
        return stats

    def calibrate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        stats: StatsSum,
        heads: tuple[str, str],
        active: list[int],
    ) -> ArrayRecord:
        """CCVR: retrain the head (``heads``: weight and bias names) on virtual
        features of every ``active`` class, drawn from the statistics of this
        very model's features; the feature extractor is left as aggregated."""
        c = self.settings
        weight_key, bias_key = heads
        numpy = numpy_arrays(arrays)
        done = calibrate_head(
            numpy[weight_key],
            numpy[bias_key],
            stats,
            active,
            samples_per_class=c.samples,
            steps=c.steps,
            lr=c.lr,
            seed=self.seed * 1009 + server_round,
        )
        if done is None:
            log.info(
                "round %d: head not calibrated (feature statistics of fewer than "
                "2 classes from %d nodes)",
                server_round,
                stats.nodes,
            )
            return arrays
        numpy[weight_key], numpy[bias_key], info = done
        log.info(
            "round %d: head calibrated on %d virtual features of %d classes "
            "(statistics from %d nodes): loss %.3f -> %.3f",
            server_round,
            info.samples,
            info.classes,
            stats.nodes,
            info.loss_before,
            info.loss_after,
        )
        return array_record(numpy)
