"""RoundFinisher alone: a round's finish inline or overlapped, in order, never lost."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Result

from apps.finisher import RoundEnd, RoundFinisher
from apps.growth import HeadGrowth
from apps.roundbook import RoundBook, RoundReport
from apps.versions import VersionKeeper
from fedobj.catalog import SyncCatalog
from fedobj.classmap import ClassMap
from fedobj.model import ModelArgs
from fedobj.registry import ArtifactStore

MAP = ClassMap.from_names([("A", "a"), ("B", "b")])


class Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.catalog = SyncCatalog(tmp_path / "catalog.db")
        self.catalog.migrate()
        self.versions = VersionKeeper(
            self.catalog, ArtifactStore(tmp_path / "registry"), "run-1"
        )
        self.versions.begin()
        self.book = RoundBook(self.catalog, "run-1")
        self.growth = HeadGrowth(ModelArgs("cnn", 2))
        self.growth.start_from(MAP)

    def end(self, rnd: int, value: float = 0.0) -> RoundEnd:
        report = RoundReport(rnd, 0.0, 0.1, MAP)
        self.book.start(report, 0)
        arrays = ArrayRecord({"w": Array(np.full(2, value, np.float32))})
        return RoundEnd(report, arrays, self.growth, None, replied=0)


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return Parts(tmp_path)


def test_a_finish_evaluates_registers_records_and_reports(parts: Parts) -> None:
    seen: list[tuple[int, float, int]] = []
    reported: list[RoundReport] = []

    def central(rnd: int, arrays: ArrayRecord, class_map: ClassMap) -> dict:
        seen.append((rnd, float(arrays["w"].numpy()[0]), class_map.num_classes))
        return {"accuracy": 0.25 * rnd}

    finisher = RoundFinisher(parts.versions, parts.book, central, reported.append)
    result = Result()
    with finisher.run(result):
        finisher.submit(parts.end(1, value=3.0))
        assert seen == [(1, 3.0, 2)]  # inline: done before submit returns
        finisher.submit(parts.end(2))
    assert [r.server_round for r in reported] == [1, 2]
    assert reported[1].version is not None and reported[1].version.is_current
    assert reported[1].version.parent_id == reported[0].version.id  # type: ignore[union-attr]
    assert reported[1].version.metrics == {"accuracy": 0.5}
    assert {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()} == {
        1: {"accuracy": 0.25},
        2: {"accuracy": 0.5},
    }
    assert [r.status for r in parts.catalog.rounds("run-1")] == ["completed"] * 2


def test_overlapped_finishes_run_while_the_next_round_trains(parts: Parts) -> None:
    """Round 1's evaluation waits until round 2 is submitted: it can only end if
    submit did not wait for it. Round 2's finish starts after round 1's."""
    round_two_trained = threading.Event()
    order: list[int] = []

    def central(rnd: int, arrays: ArrayRecord, class_map: ClassMap) -> dict:
        if rnd == 1:
            assert round_two_trained.wait(30)
        order.append(rnd)
        return {}

    finisher = RoundFinisher(parts.versions, parts.book, central, overlap=True)
    result = Result()
    with finisher.run(result):
        finisher.submit(parts.end(1))
        round_two_trained.set()
        finisher.submit(parts.end(2))
    assert order == [1, 2]
    assert sorted(v.round for v in parts.catalog.list_versions()) == [1, 2]
    assert result.evaluate_metrics_serverapp == {}  # no central metrics: none kept


def test_a_failed_round_does_not_lose_the_finish_still_running(parts: Parts) -> None:
    finisher = RoundFinisher(parts.versions, parts.book, overlap=True)
    with pytest.raises(ConnectionError), finisher.run(Result()):
        finisher.submit(parts.end(1))
        raise ConnectionError("round 2: SuperLink gone")
    assert [v.round for v in parts.catalog.list_versions()] == [1]


def test_a_finish_that_fails_surfaces_its_error(parts: Parts) -> None:
    def central(rnd: int, arrays: ArrayRecord, class_map: ClassMap) -> dict:
        raise RuntimeError(f"evaluation of round {rnd} failed")

    finisher = RoundFinisher(parts.versions, parts.book, central, overlap=True)
    with pytest.raises(RuntimeError, match="round 1 failed"), finisher.run(Result()):
        finisher.submit(parts.end(1))


def test_a_round_end_is_what_the_round_had_not_what_follows(parts: Parts) -> None:
    class Adam:
        m_t = {"w": np.ones(2)}
        v_t = {"w": np.ones(2)}

    end = RoundEnd(
        RoundReport(1, 0.0, 0.1, MAP), ArrayRecord(), parts.growth, Adam(), parent=7
    )
    parts.growth.follow(ClassMap.from_names([("C", "c")]), ModelArgs("cnn", 1))
    assert end.class_map == MAP and end.model_args.num_classes == 2
    assert end.server_state is not None and end.parent == 7 and end.replied == 0
