"""What the console's pages show (``admin_api.console.views``), on records built
by hand and expectations worked out by hand."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from admin_api.console.views import (
    FeedLine,
    Overview,
    build_feed,
    build_series,
    class_rows,
    confusion,
    duration,
    federated,
    federated_by_round,
    overview,
    short_reason,
)
from fedobj.catalog import (
    Catalog,
    NodeRoundRecord,
    RoundRecord,
    VersionRecord,
    migrate,
)
from fedobj.classmap import ClassEntry, ClassMap
from fedobj.confusion import confusion_metrics
from tests.fedobj.catalog.helpers import FakeClock

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
RUN = "run-1"


def _round(
    n: int,
    *,
    status: str = "completed",
    sampled: int = 10,
    replied: int = 10,
    rejected: int = 0,
    seconds: float | None = 10.0,
    accuracy: float | None = None,
    loss: float | None = None,
) -> RoundRecord:
    started = T0 + timedelta(minutes=n)
    return RoundRecord(
        run_id=RUN,
        round=n,
        status=status,
        nodes_sampled=sampled,
        nodes_replied=replied,
        nodes_rejected=rejected,
        started_at=started,
        completed_at=None if seconds is None else started + timedelta(seconds=seconds),
        central_accuracy=accuracy,
        central_loss=loss,
    )


def _node(
    round: int,
    kind: str,
    *,
    examples: int = 0,
    accuracy: float | None = None,
    loss: float | None = None,
    error: str | None = None,
    node: str = "n",
) -> NodeRoundRecord:
    return NodeRoundRecord(
        run_id=RUN,
        round=round,
        node_id=node,
        kind=kind,
        num_examples=examples,
        loss=loss,
        accuracy=accuracy,
        error=error,
        created_at=T0,
    )


def _classes(n: int, inactive: tuple[int, ...] = ()) -> ClassMap:
    return ClassMap(
        tuple(
            ClassEntry(i, f"class-{i}", f"Class {i}", i not in inactive)
            for i in range(n)
        )
    )


def _version(
    number: int,
    round: int,
    classes: ClassMap,
    metrics: dict[str, Any] | None = None,
) -> VersionRecord:
    return VersionRecord(
        id=uuid.uuid4(),
        number=number,
        name=f"v{number:04d}",
        parent_id=None,
        run_id=RUN,
        round=round,
        class_map=classes,
        metrics=metrics or {},
        accuracy=None,
        checkpoint_uri=f"file:///x/{number}.pt",
        checkpoint_sha256="0" * 64,
        onnx_uri=None,
        size_bytes=1,
        provenance={},
        server_state_uri=None,
        artifacts={},
        is_current=False,
        pruned=False,
        notes="",
        created_at=T0,
    )


# ---------------------------------------------------------------- the feed


def test_feed_line_text_of_a_round_with_a_rejection() -> None:
    rounds = [_round(7, sampled=10, replied=9, rejected=1, seconds=12.3)]
    nodes = [
        _node(7, "train", error="shape: layer fc.weight is (10, 64), expected (9, 64)")
    ]
    versions = [_version(7, 7, _classes(10))]
    [line] = build_feed(rounds, nodes, versions)
    assert line.text == "round 7: 9/10 nodes, 1 rejected (shape), v0007, 12.3 s"
    assert (line.reasons, line.version, line.classes, line.grew) == (
        {"shape": 1},
        "v0007",
        10,
        False,
    )


def test_feed_is_newest_first_and_flags_where_the_head_grew() -> None:
    rounds = [_round(1), _round(2), _round(3), _round(4)]
    versions = [
        _version(1, 1, _classes(10)),
        _version(2, 2, _classes(10)),
        _version(3, 3, _classes(11)),  # a category was added: the head grew
        _version(4, 4, _classes(11)),
    ]
    feed = build_feed(rounds, [], versions)
    assert [line.round for line in feed] == [4, 3, 2, 1]
    assert [line.grew for line in feed] == [False, True, False, False]
    assert (
        feed[1].text == "round 3: 10/10 nodes, v0003, head grew to 11 classes, 10.0 s"
    )
    # versions handed over in any order: growth is judged in round order
    assert build_feed(rounds, [], versions[::-1]) == feed


def test_feed_growth_is_judged_against_the_last_round_that_made_a_version() -> None:
    # round 2 failed and made no version; round 3's 12 classes grew from round 1's 10
    rounds = [_round(1), _round(2, status="failed", replied=0), _round(3)]
    versions = [_version(1, 1, _classes(10)), _version(2, 3, _classes(12))]
    feed = build_feed(rounds, [], versions)
    assert [(line.round, line.version, line.grew) for line in feed] == [
        (3, "v0002", True),
        (2, None, False),
        (1, "v0001", False),
    ]
    assert feed[1].text == "round 2: 0/10 nodes, failed, 10.0 s"


def test_feed_of_a_round_in_progress_and_of_rejections_with_several_reasons() -> None:
    rounds = [_round(1, replied=7, rejected=3), _round(2, status="in_progress")]
    rounds[1] = RoundRecord(**{**rounds[1].__dict__, "completed_at": None})
    nodes = [
        _node(1, "train", error="NaN: weights were not finite"),
        _node(1, "train", error="shape: wrong head"),
        _node(1, "train", error="NaN: again"),
        _node(1, "evaluate", error="timeout: ignored, not a training rejection"),
        _node(1, "train", examples=10),
    ]
    feed = build_feed(rounds, nodes, [])
    assert feed[0].text == "round 2: 10/10 nodes, training…"
    assert feed[0].seconds is None
    assert feed[1].reasons == {"nan": 2, "shape": 1}
    assert feed[1].text == "round 1: 7/10 nodes, 3 rejected (nan, shape), 10.0 s"


def test_short_reason() -> None:
    assert short_reason("Shape: expected (10, 64)") == "shape"
    assert short_reason("no colon here") == "no colon here"
    assert short_reason(": nothing before") == "invalid"
    assert short_reason("x" * 100 + ": long") == "x" * 40


def test_a_feed_line_with_no_rejection_reasons_recorded_says_invalid() -> None:
    line = FeedLine(3, "completed", 4, 3, 1, {}, None, None, None, False)
    assert line.text == "round 3: 3/4 nodes, 1 rejected (invalid)"


# ---------------------------------------------------------------- federated


def test_federated_weights_by_examples_and_ignores_errors_and_train_replies() -> None:
    results = [
        _node(1, "evaluate", examples=100, accuracy=0.9, loss=0.2),
        _node(1, "evaluate", examples=300, accuracy=0.5, loss=1.0),
        _node(1, "evaluate", examples=1000, accuracy=0.0, error="timeout"),
        _node(1, "train", examples=5000, accuracy=0.1, loss=9.0),
    ]
    acc, loss = federated(results)
    # (0.9*100 + 0.5*300) / 400 = 240 / 400; (0.2*100 + 1.0*300) / 400 = 320 / 400
    assert acc == pytest.approx(0.6)
    assert loss == pytest.approx(0.8)


def test_federated_of_nothing_usable_is_none() -> None:
    assert federated([]) == (None, None)
    assert federated([_node(1, "evaluate", examples=10, error="x")]) == (None, None)
    assert federated([_node(1, "evaluate", examples=0, accuracy=1.0)]) == (None, None)
    # loss reported, accuracy not: only the loss is known
    assert federated([_node(1, "evaluate", examples=4, loss=0.5)]) == (None, 0.5)


# ---------------------------------------------------------------- series


def test_series_columns_hold_completed_rounds_with_gaps_as_none() -> None:
    rounds = [
        _round(1, accuracy=0.5, loss=1.5),
        _round(2, accuracy=0.6, loss=1.2),
        _round(3, status="failed"),
        _round(4, accuracy=0.7, loss=None),
        _round(5, status="in_progress", seconds=None),
    ]
    nodes = [
        _node(1, "evaluate", examples=10, accuracy=0.4, loss=2.0),
        _node(1, "evaluate", examples=30, accuracy=0.8, loss=1.0),
        _node(3, "evaluate", examples=10, accuracy=0.1, loss=3.0),  # failed round
        _node(4, "evaluate", examples=5, accuracy=0.2, error="rejected"),
    ]
    versions = [
        _version(1, 1, _classes(10)),
        _version(2, 2, _classes(11)),
        _version(3, 4, _classes(11)),
    ]
    feed = build_feed(rounds, nodes, versions)
    series = build_series(rounds, federated_by_round(nodes), feed)
    assert set(series) == {
        "round",
        "central_accuracy",
        "central_loss",
        "federated_accuracy",
        "federated_loss",
        "grew_at",
    }
    assert series["round"] == [1, 2, 4]
    assert series["central_accuracy"] == [0.5, 0.6, 0.7]
    assert series["central_loss"] == [1.5, 1.2, None]
    # round 1: (0.4*10 + 0.8*30) / 40 = 0.7; (2*10 + 1*30) / 40 = 1.25
    assert series["federated_accuracy"] == pytest.approx([0.7, None, None])
    assert series["federated_loss"] == pytest.approx([1.25, None, None])
    assert series["grew_at"] == [2]
    assert all(len(series[k]) == 3 for k in series if k != "grew_at")


# ---------------------------------------------------------------- a version


def test_class_rows_carry_each_class_and_its_measured_accuracy() -> None:
    classes = _classes(3, inactive=(1,))
    metrics = {
        "accuracy": 0.8,
        "class-0-accuracy": 0.75,
        "class-2-accuracy": 1,  # an int from JSON is still a number
        "class-1-accuracy": "n/a",  # not a number: shown as unmeasured
    }
    rows = class_rows(_version(1, 1, classes, metrics))
    assert [(r.index, r.name, r.slug, r.active, r.accuracy) for r in rows] == [
        (0, "Class 0", "class-0", True, 0.75),
        (1, "Class 1", "class-1", False, None),
        (2, "Class 2", "class-2", True, 1.0),
    ]


def test_confusion_of_a_version_is_labelled_with_class_names() -> None:
    # true 0: 5 right, 1 taken for 2; true 2: 3 right, 2 taken for 0.
    # class 1 is in neither: no row or column for it
    cells = {(0, 0): 5, (0, 2): 1, (2, 2): 3, (2, 0): 2, (0, 1): 0}
    version = _version(1, 1, _classes(3), {"accuracy": 0.8, **confusion_metrics(cells)})
    labels, matrix = confusion(version)
    assert labels == ["Class 0", "Class 2"]
    assert matrix == [[5, 1], [2, 3]]


def test_confusion_names_a_class_missing_from_the_map_by_its_index() -> None:
    version = _version(1, 1, _classes(2), confusion_metrics({(0, 0): 1, (7, 0): 2}))
    labels, matrix = confusion(version)
    assert labels == ["Class 0", "#7"]
    assert matrix == [[1, 0], [2, 0]]


def test_a_version_without_a_confusion_matrix() -> None:
    assert confusion(_version(1, 1, _classes(3), {"accuracy": 0.5})) == ([], [])


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "seconds, text",
    [
        (None, "–"),
        (0.0, "0.0 s"),
        (12.34, "12.3 s"),
        (59.94, "59.9 s"),
        (60, "1 min 00 s"),
        (185.9, "3 min 05 s"),
        (3599, "59 min 59 s"),
        (3600, "1 h 00 min"),
        (3725, "1 h 02 min"),
        (26 * 3600 + 61, "26 h 01 min"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


# ---------------------------------------------------------------- overview


def test_overview_of_a_real_catalog_counts_rounds_elapsed_and_eta(
    tmp_path: Path,
) -> None:
    url = f"sqlite://{tmp_path / 'catalog.db'}"
    migrate(url)
    clock = FakeClock()
    start = clock.now
    catalog = Catalog(url, clock=clock)

    async def main() -> Overview:
        await catalog.begin_run(
            RUN, strategy="fedavg", model="cnn", first_round=1, last_round=5
        )
        await catalog.start_round(RUN, 1, sampled=4)
        clock.advance(10)
        await catalog.finish_round(RUN, 1, replied=4, rejected=0, accuracy=0.5)
        await catalog.start_round(RUN, 2, sampled=4)
        clock.advance(20)
        await catalog.finish_round(RUN, 2, replied=3, rejected=1, accuracy=0.6)
        await catalog.start_round(RUN, 3, sampled=4)
        return await overview(catalog, now=start + timedelta(seconds=40))

    view = asyncio.run(main())
    assert view.run is not None and view.run.status == "running"
    assert (view.round_now, view.round_total) == (3, 5)
    assert view.elapsed_s == pytest.approx(40.0)
    # 2 of 5 rounds done, each took (10 + 20) / 2 = 15 s on average: 3 * 15 s
    assert view.eta_s == pytest.approx(45.0)
    assert [line.round for line in view.feed] == [3, 2, 1]
    assert view.feed[0].text == "round 3: 0/4 nodes, training…"
    assert view.series["round"] == [1, 2]
    assert view.series["central_accuracy"] == [0.5, 0.6]


def test_overview_of_a_run_recorded_without_a_run_row(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'catalog.db'}"
    migrate(url)
    clock = FakeClock()
    catalog = Catalog(url, clock=clock)

    async def main() -> Overview:
        assert (await overview(catalog)).run is None
        await catalog.start_round("old-run", 1, sampled=2)
        clock.advance(30)
        await catalog.finish_round("old-run", 1, replied=2, rejected=0)
        return await overview(catalog, now=clock.now + timedelta(hours=1))

    view = asyncio.run(main())
    assert view.run is not None
    assert (view.run.run_id, view.run.status) == ("old-run", "completed")
    assert (view.round_now, view.round_total) == (1, 1)
    # ended when its last round did, not at ``now``; nothing left to wait for
    assert view.elapsed_s == pytest.approx(30.0)
    assert view.eta_s is None


def test_the_databases_federated_sums_match_the_python_ones(catalog_url: str) -> None:
    from fedobj.catalog import SyncCatalog

    catalog = SyncCatalog(catalog_url)
    rows = [
        (1, "a", "evaluate", 30, 0.6, 0.9, None),
        (1, "b", "evaluate", 10, 1.0, 0.1, None),
        (1, "c", "evaluate", 50, 0.0, 5.0, "node data unusable"),
        (1, "a", "train", 100, 0.9, 0.2, None),
        (2, "a", "evaluate", 4, None, 0.5, None),
        (3, "a", "evaluate", 0, 1.0, 1.0, None),
    ]
    for rnd, node, kind, n, acc, loss, error in rows:
        catalog.record_node_round(
            "fed-run",
            rnd,
            node,
            kind,
            num_examples=n,
            accuracy=acc,
            loss=loss,
            error=error,
        )
    in_python = federated_by_round(catalog.node_rounds("fed-run"))
    in_sql = asyncio.run(catalog.aio.federated_by_round("fed-run"))
    assert in_sql.keys() == {1, 2, 3}
    for r, (acc, loss) in in_python.items():
        got = in_sql[r]
        assert got[0] == pytest.approx(acc) if acc is not None else got[0] is None
        assert got[1] == pytest.approx(loss) if loss is not None else got[1] is None
    assert in_sql[1][0] == pytest.approx(0.7)  # (30*0.6 + 10*1.0) / 40
    assert [n.node_id for n in catalog.node_rounds("fed-run", errors_only=True)] == [
        "c"
    ]
