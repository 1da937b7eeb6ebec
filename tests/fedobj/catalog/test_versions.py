"""Model versions: registration, exactly one current, rollback, best, pruning."""

from __future__ import annotations

import sqlite3
from typing import Any

import asyncpg
import numpy as np
import pytest
from piccolo.utils.sync import run_sync

from fedobj.catalog import (
    ConflictError,
    DuplicateVersionError,
    NotFoundError,
    SyncCatalog,
    VersionPrunedError,
    VersionRecord,
)
from fedobj.classmap import ClassMap


def _register(catalog: SyncCatalog, accuracy: Any, **kwargs: Any) -> VersionRecord:
    defaults: dict[str, Any] = {
        "run_id": "run-1",
        "round": 1,
        "class_map": catalog.snapshot(),
        "metrics": {"accuracy": accuracy, "loss": 1.0},
        "checkpoint_uri": "file:///ckpt.pt",
        "checkpoint_sha256": "ab" * 32,
        "size_bytes": 1234,
    }
    defaults.update(kwargs)
    return catalog.register_version(**defaults)


def _currents(catalog: SyncCatalog) -> list[str]:
    return [v.name for v in catalog.list_versions() if v.is_current]


def test_register_stores_everything(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a", "b"])
    v = _register(
        catalog,
        np.float32(0.75),
        metrics={
            "accuracy": np.float32(0.75),
            "loss": float("nan"),
            "per_class": {"a": np.float64(0.5), "b": 1.0},
        },
        provenance={"seed": 42, "packages": {"torch": "2"}},
        onnx_uri=None,
        server_state_uri="file:///state.npz",
        notes="first",
    )
    again = catalog.get_version(v.id)
    assert again == catalog.get_version("v0001") == v
    assert (v.name, v.number, v.run_id, v.round, v.size_bytes) == (
        "v0001",
        1,
        "run-1",
        1,
        1234,
    )
    assert v.class_map == catalog.snapshot()
    assert v.metrics == {
        "accuracy": 0.75,
        "loss": None,
        "per_class": {"a": 0.5, "b": 1.0},
    }
    assert v.accuracy == pytest.approx(0.75)
    assert v.provenance == {"seed": 42, "packages": {"torch": "2"}}
    assert (v.server_state_uri, v.notes, v.is_current, v.pruned) == (
        "file:///state.npz",
        "first",
        True,
        False,
    )
    assert v.parent_id is None


def test_register_moves_current_and_links_parent(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    v1 = _register(catalog, 0.5)
    v2 = _register(catalog, 0.6, round=2, parent=v1.id)
    v3 = _register(catalog, 0.7, round=3, parent="v0002", make_current=False)
    assert _currents(catalog) == ["v0002"]
    assert catalog.current_version() == catalog.get_version(v2.id)
    assert (v2.parent_id, v3.parent_id) == (v1.id, v2.id)
    assert [v.name for v in catalog.list_versions()] == ["v0003", "v0002", "v0001"]
    assert [v.name for v in catalog.list_versions(limit=1, offset=1)] == ["v0002"]


def test_first_version_is_current_even_if_not_asked(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    assert catalog.current_version() is None
    _register(catalog, 0.5, make_current=False)
    assert _currents(catalog) == ["v0001"]


def test_register_errors(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    _register(catalog, 0.5, name="best-ever")
    with pytest.raises(DuplicateVersionError):
        _register(catalog, 0.6, name="best-ever")
    with pytest.raises(NotFoundError):
        _register(catalog, 0.6, parent="v9999")
    assert _currents(catalog) == ["best-ever"]  # failed ones changed nothing


def test_exactly_one_current_is_enforced_by_the_database(
    catalog: SyncCatalog,
) -> None:
    catalog.seed_categories(["a"])
    for acc in (0.1, 0.2, 0.3):
        _register(catalog, acc)
    table = catalog.aio.tables.ModelVersion
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        run_sync(table.raw("UPDATE model_version SET is_current = TRUE").run())
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        run_sync(
            table.raw(
                "UPDATE model_version SET is_current = TRUE WHERE name = {}", "v0001"
            ).run()
        )
    assert _currents(catalog) == ["v0003"]


def test_rollback_and_best(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a", "b"])
    v1 = _register(catalog, 0.5)
    v2 = _register(catalog, 0.8, round=2)
    _register(catalog, 0.6, round=3)
    assert catalog.best_version(catalog.snapshot()) == catalog.get_version(v2.id)

    rolled = catalog.set_current(v1.id)  # rollback to an older version
    assert rolled.is_current and _currents(catalog) == ["v0001"]
    assert catalog.set_current("v0001").is_current  # already current: no-op

    catalog.add_category("c")  # a new class map: a different problem
    grown = catalog.snapshot()
    assert catalog.best_version(grown) is None
    v4 = _register(catalog, 0.4, round=4, class_map=grown)
    assert catalog.best_version(grown) == catalog.get_version(v4.id)
    old_map = ClassMap(tuple(e for e in grown.entries if e.slug != "c"))
    assert catalog.best_version(old_map) == catalog.get_version(v2.id)

    catalog.deactivate_category("b")  # masking also changes the class map
    assert catalog.best_version(catalog.snapshot()) is None


def test_best_ignores_missing_accuracy(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    _register(catalog, None)
    assert catalog.best_version(catalog.snapshot()) is None
    v = _register(catalog, 0.1)
    assert catalog.best_version(catalog.snapshot()) == catalog.get_version(v.id)


def test_pruning(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    v1 = _register(catalog, 0.9)
    v2 = _register(catalog, 0.1, round=2)
    with pytest.raises(ConflictError, match="current"):
        catalog.mark_pruned(v2.id)
    assert catalog.mark_pruned(v1.id).pruned
    with pytest.raises(VersionPrunedError):
        catalog.set_current(v1.id)
    assert catalog.best_version(catalog.snapshot()) == catalog.get_version(v2.id)
    best_any = catalog.best_version(catalog.snapshot(), include_pruned=True)
    assert best_any is not None and best_any.id == v1.id
    assert [v.name for v in catalog.list_versions(include_pruned=False)] == ["v0002"]


def test_update_version_and_missing(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    v = _register(catalog, 0.5)
    updated = catalog.update_version(v.id, onnx_uri="file:///m.onnx", notes="exported")
    assert (updated.onnx_uri, updated.notes) == ("file:///m.onnx", "exported")
    for missing in ("nope", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(NotFoundError):
            catalog.get_version(missing)
        with pytest.raises(NotFoundError):
            catalog.set_current(missing)
