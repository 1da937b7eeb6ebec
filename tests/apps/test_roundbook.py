"""RoundBook alone, on a real SQLite catalog: round and node rows, counts once
per run, the reports kept and the training times remembered."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.replies import NodeOutcome
from apps.roundbook import REPORTS_KEPT, RoundBook, RoundReport
from fedobj import keys
from fedobj.catalog import SyncCatalog
from fedobj.data.categories import FASHION_MNIST_NAMES


@pytest.fixture
def catalog(tmp_path: Path) -> SyncCatalog:
    catalog = SyncCatalog(tmp_path / "catalog.db")
    catalog.migrate()
    catalog.seed_categories(FASHION_MNIST_NAMES[:3])  # t-shirt-top, trouser, pullover
    return catalog


def trained(node: int, labels: dict[str, int], **metrics: float) -> NodeOutcome:
    numbers = {keys.NUM_EXAMPLES: float(sum(labels.values())), **metrics}
    return NodeOutcome(node, numbers, labels=labels)


def test_only_the_last_reports_are_kept(catalog: SyncCatalog) -> None:
    book = RoundBook(catalog, "run-1")
    for r in range(1, REPORTS_KEPT + 3):
        book.open(RoundReport(r, 0.0, 0.1, catalog.snapshot()))
    assert sorted(book.reports) == list(range(3, REPORTS_KEPT + 3))


def test_a_round_is_recorded_node_by_node(catalog: SyncCatalog) -> None:
    """Node 11 trained on 6 t-shirts and 4 trousers, node 12's reply was rejected
    after it replied, node 13 failed; node 11 evaluated. The round row counts 1
    reply aggregated and 2 rejected, with the central accuracy."""
    book = RoundBook(catalog, "run-1")
    report = RoundReport(1, 0.0, 0.1, catalog.snapshot())
    book.open(report)
    book.start(report, 3)
    assert report.sampled == 3 and catalog.rounds("run-1")[0].status == "in_progress"
    rejected = [NodeOutcome(12, error="NaN", failure="invalid")]
    rejected.append(NodeOutcome(13, error="declined", failure="error"))
    outcomes = [
        trained(11, {"t-shirt-top": 6, "trouser": 4}, **{keys.TRAIN_SECONDS: 2.5}),
        trained(12, {"trouser": 5}),
        rejected[1],
    ]
    book.trained(report, outcomes, rejected)
    book.evaluated(report, [NodeOutcome(11, {keys.EVAL_ACCURACY: 0.75})])
    report.central = {"accuracy": 0.5, "loss": 1.5}
    book.record(report, replied=1)

    (row,) = catalog.rounds("run-1")
    assert (row.status, row.nodes_sampled, row.nodes_replied) == ("completed", 3, 1)
    assert (row.nodes_rejected, row.central_accuracy) == (2, 0.5)
    rows = {(n.kind, n.node_id): n for n in catalog.node_rounds("run-1", 1)}
    assert rows[("train", "11")].num_examples == 10
    assert rows[("train", "11")].train_seconds == 2.5
    assert rows[("train", "12")].error == "NaN"  # rejected after it replied
    assert rows[("train", "13")].error == "declined"
    assert rows[("evaluate", "11")].accuracy == 0.75
    # nodes whose replies said something true about their images are counted,
    # a rejected one too (its histogram adds up), a failed one not at all
    counts = {c.slug: c.sample_count for c in catalog.list_categories()}
    assert counts == {"t-shirt-top": 6, "trouser": 9, "pullover": 0}
    assert sorted(n.node_id for n in catalog.list_nodes()) == ["11", "12"]


def test_a_node_counts_each_category_once_per_run(catalog: SyncCatalog) -> None:
    book = RoundBook(catalog, "run-1")
    cmap = catalog.snapshot()
    book.node_seen(trained(11, {"t-shirt-top": 6}), cmap)
    book.node_seen(trained(11, {"t-shirt-top": 6, "trouser": 2}), cmap)
    book.node_seen(trained(12, {"t-shirt-top": 3}), cmap)
    counts = {c.slug: c.sample_count for c in catalog.list_categories()}
    assert counts["t-shirt-top"] == 9 and counts["trouser"] == 2
    assert book.counted_labels == {11: {"t-shirt-top", "trouser"}, 12: {"t-shirt-top"}}
    node = catalog.get_node(11)
    assert node.samples == 8 and node.label_names == ["t-shirt-top", "trouser"]


def test_a_histogram_that_says_nothing_true_is_not_counted(
    catalog: SyncCatalog,
) -> None:
    """10 examples but a histogram of 12 images, and a slug outside the class map:
    the node row is kept (with its example count), no category count moves."""
    book = RoundBook(catalog, "run-1")
    cmap = catalog.snapshot()
    wrong_sum = NodeOutcome(11, {keys.NUM_EXAMPLES: 10}, labels={"trouser": 12})
    book.node_seen(wrong_sum, cmap)
    book.node_seen(trained(12, {"sneaker": 4}), cmap)
    assert all(c.sample_count == 0 for c in catalog.list_categories())
    assert catalog.get_node(11).samples == 10 and catalog.get_node(11).label_names == []


def test_training_times_and_rejections_are_kept_and_logged(
    catalog: SyncCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    book = RoundBook(catalog, "run-1")
    held = book.last_train_seconds  # the strategy hands this dict to dispatch_plan
    report = RoundReport(4, 0.0, 0.1, catalog.snapshot())
    bad = NodeOutcome(13, error="no reply within 30 s", failure="timeout")
    ok = NodeOutcome(11, {keys.TRAIN_SECONDS: 3.0, keys.NUM_EXAMPLES: 5})
    with caplog.at_level("WARNING", logger="fedobj"):
        book.trained(report, [ok, bad], [bad])
        book.evaluated(report, [ok, NodeOutcome(12, error="crashed")])
    assert report.train == [ok, bad] and report.rejected == [bad]
    assert held == {11: 3.0} and book.last_train_seconds is held
    assert "round 4: reply from node 13 rejected: no reply within 30 s" in caplog.text
    assert "round 4: evaluate reply from node 12 rejected: crashed" in caplog.text
    assert "node 11" not in caplog.text
