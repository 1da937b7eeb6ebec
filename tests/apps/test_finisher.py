"""RoundFinisher alone: a round's finish, in order, and its errors surfaced."""

from __future__ import annotations

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
    finisher.finish(parts.end(1, value=3.0), result)
    assert seen == [(1, 3.0, 2)]
    finisher.finish(parts.end(2), result)
    assert [r.server_round for r in reported] == [1, 2]
    assert reported[1].version is not None and reported[1].version.is_current
    assert reported[1].version.parent_id == reported[0].version.id  # type: ignore[union-attr]
    assert reported[1].version.metrics == {"accuracy": 0.5}
    assert {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()} == {
        1: {"accuracy": 0.25},
        2: {"accuracy": 0.5},
    }
    assert [r.status for r in parts.catalog.rounds("run-1")] == ["completed"] * 2


def test_a_finish_without_central_metrics_keeps_none(parts: Parts) -> None:
    finisher = RoundFinisher(parts.versions, parts.book, lambda *_: {})
    result = Result()
    finisher.finish(parts.end(1), result)
    assert [v.round for v in parts.catalog.list_versions()] == [1]
    assert result.evaluate_metrics_serverapp == {}


def test_a_finish_that_fails_surfaces_its_error(parts: Parts) -> None:
    def central(rnd: int, arrays: ArrayRecord, class_map: ClassMap) -> dict:
        raise RuntimeError(f"evaluation of round {rnd} failed")

    finisher = RoundFinisher(parts.versions, parts.book, central)
    with pytest.raises(RuntimeError, match="round 1 failed"):
        finisher.finish(parts.end(1), Result())


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
