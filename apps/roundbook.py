"""A run's bookkeeping: round reports, round and node rows, per-category counts.

The catalog is what the admin plane and the console read while a run goes on
(``TrainingRound``, ``Node`` and per-node round rows, each category's
``sample_count``), so every round must leave its rows, and counts must stay
true however many rounds a node takes part in: a node's images of a category
are added once per run. :class:`RoundBook` writes those rows from each round's
:class:`RoundReport`, and keeps the last few reports for inspection and the
last round's training times (the order of the next round's pushes).

It touches no Flower message: a round's replies arrive already read
(:class:`apps.replies.NodeOutcome`), so it is tested with a catalog alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from apps.replies import NodeOutcome, count_of, histogram_problem
from fedobj import keys
from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import VersionRecord
from fedobj.classmap import ClassMap

# the round's lines, wherever the step that writes them lives
log = logging.getLogger("fedobj.strategy")

REPORTS_KEPT = 5
"""Recent round reports kept for inspection; older ones (per-node results) go."""


@dataclass
class RoundReport:
    """What happened in one round, for outputs, logs and the catalog."""

    server_round: int
    started: float
    lr: float
    class_map: ClassMap
    sampled: int = 0
    train: list[NodeOutcome] = field(default_factory=list)
    rejected: list[NodeOutcome] = field(default_factory=list)
    evaluate: list[NodeOutcome] = field(default_factory=list)
    grew_from: int | None = None
    rolled_back_to: str | None = None
    version: VersionRecord | None = None
    central: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # central DP: spend so far and its ledger


def last_train_seconds(outcomes: list[NodeOutcome]) -> dict[int, float]:
    """Each replying node's training time (0 for a node with nothing to train).

    Only this round's replies: bounded by the round's sample, nothing kept per
    node across the run. Non-finite or negative times are left out (unknown).
    """
    out: dict[int, float] = {}
    for o in outcomes:
        if o.failure is not None:
            continue
        value = o.metrics.get(keys.TRAIN_SECONDS)
        if value is None and o.metrics.get(keys.NUM_EXAMPLES) == 0:
            value = 0.0
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            out[o.node_id] = float(value)
    return out


class RoundBook:
    """Writes a run's rounds into the catalog and keeps what later rounds read.

    Parameters
    ----------
    catalog
        Where round, node and category rows live.
    run_id
        The run the rows belong to.
    """

    def __init__(self, catalog: SyncCatalog, run_id: str) -> None:
        self.catalog = catalog
        self.run_id = run_id
        self.reports: dict[int, RoundReport] = {}
        # per node, the category slugs whose images it has already added to the
        # catalog's sample counts this run (bounded by nodes x categories)
        self.counted_labels: dict[int, set[str]] = {}
        # each node's training seconds in the last round (its replies only, so
        # bounded by a round's sample): the order of the next round's pushes
        self.last_train_seconds: dict[int, float] = {}

    def open(self, report: RoundReport) -> None:
        """Keep a new round's report; the oldest go (memory must not grow with
        rounds)."""
        self.reports[report.server_round] = report
        while len(self.reports) > REPORTS_KEPT:
            del self.reports[min(self.reports)]

    def start(self, report: RoundReport, sampled: int) -> None:
        """The round's train messages are configured: its row opens."""
        report.sampled = sampled
        self.catalog.start_round(self.run_id, report.server_round, sampled)

    def trained(
        self,
        report: RoundReport,
        outcomes: list[NodeOutcome],
        rejected: list[NodeOutcome],
    ) -> None:
        """The round's train replies: every node's outcome, those not aggregated
        (logged with the node id and why: contract 5), and the training times
        that order the next round's pushes (:func:`last_train_seconds`)."""
        report.train, report.rejected = outcomes, rejected
        self.last_train_seconds.clear()  # one dict for the run: callers hold it
        self.last_train_seconds.update(last_train_seconds(outcomes))
        for bad in rejected:
            log.warning(
                "round %d: reply from node %d rejected: %s",
                report.server_round,
                bad.node_id,
                bad.error,
            )

    def evaluated(self, report: RoundReport, outcomes: list[NodeOutcome]) -> None:
        """The round's evaluate replies: every node's outcome, failures logged."""
        report.evaluate = outcomes
        for bad in outcomes:
            if bad.error is not None:
                log.warning(
                    "round %d: evaluate reply from node %d rejected: %s",
                    report.server_round,
                    bad.node_id,
                    bad.error,
                )

    def node_seen(self, n: NodeOutcome, class_map: ClassMap) -> None:
        """Keep ``Node`` rows and categories' ``sample_count`` real.

        A node's count of a category is added once per run (the first time it
        reports that category), so repeated rounds do not inflate the counts,
        and a category added mid-run is counted on the nodes that were counted
        before it existed (their images of it were ignored until then).
        """
        examples = count_of(n.metrics.get(keys.NUM_EXAMPLES))
        labels = n.labels
        if histogram_problem(labels, examples, class_map.slug_to_index) is not None:
            labels = {}  # says nothing true: not counted
        self.catalog.upsert_node(
            n.node_id,
            samples=examples,
            label_names=sorted(labels),
            dp_epsilon=n.metrics.get(keys.DP_EPSILON),
        )
        counted = self.counted_labels.setdefault(n.node_id, set())
        fresh = {slug: c for slug, c in labels.items() if slug not in counted}
        if fresh:
            self.catalog.add_sample_counts(fresh)  # a slug deleted meanwhile: skipped
            counted.update(fresh)

    def record(self, report: RoundReport, replied: int) -> None:
        """Write the round's per-node rows, count its nodes, close its row."""
        r = report.server_round
        for kind, results in (("train", report.train), ("evaluate", report.evaluate)):
            rejected = {b.node_id: b.error for b in report.rejected}
            for n in results:
                m = n.metrics
                error = n.error or (
                    rejected.get(n.node_id) if kind == "train" else None
                )
                self.catalog.record_node_round(
                    self.run_id,
                    r,
                    n.node_id,
                    kind,
                    num_examples=count_of(m.get(keys.NUM_EXAMPLES)),
                    loss=m.get(keys.TRAIN_LOSS if kind == "train" else keys.EVAL_LOSS),
                    accuracy=m.get(
                        keys.TRAIN_ACCURACY if kind == "train" else keys.EVAL_ACCURACY
                    ),
                    error=error,
                    train_seconds=m.get(keys.TRAIN_SECONDS)
                    if kind == "train"
                    else None,
                    dp_epsilon=m.get(keys.DP_EPSILON) if kind == "train" else None,
                )
                if kind == "train" and n.error is None:
                    self.node_seen(n, report.class_map)
        self.catalog.finish_round(
            self.run_id,
            r,
            replied=replied,
            rejected=len(report.rejected),
            accuracy=report.central.get("accuracy"),
            loss=report.central.get("loss"),
        )
