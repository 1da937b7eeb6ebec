"""VersionKeeper alone, on a real SQLite catalog and artifact store: parents,
which version becomes current, rollbacks followed, server state kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apps.central_dp import PROVENANCE_KEY
from apps.versions import VersionKeeper, server_state
from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import VersionRecord
from fedobj.classmap import ClassMap
from fedobj.model import ModelArgs
from fedobj.registry import ArtifactStore

ARGS = ModelArgs("cnn", 2)
MAP = ClassMap.from_names([("A", "a"), ("B", "b")])


class Adam:
    """What the keeper reads and writes of FedAdam: its two moments."""

    def __init__(self, m: float | None = None) -> None:
        self.m_t = None if m is None else {"w": np.full((2,), m)}
        self.v_t = None if m is None else {"w": np.full((2,), m * m)}


@pytest.fixture
def parts(tmp_path: Path) -> tuple[SyncCatalog, ArtifactStore]:
    catalog = SyncCatalog(tmp_path / "catalog.db")
    catalog.migrate()
    return catalog, ArtifactStore(tmp_path / "registry")


def register(
    keeper: VersionKeeper, rnd: int, accuracy: float = 0.5, **kw: object
) -> VersionRecord:
    return keeper.register(
        rnd,
        {"w": torch.full((2,), float(rnd))},
        metrics={"accuracy": accuracy},
        class_map=MAP,
        model_args=ARGS,
        **kw,  # type: ignore[arg-type]
    )


def test_each_version_is_the_parent_of_the_next_and_becomes_current(parts) -> None:  # noqa: ANN001
    catalog, store = parts
    keeper = VersionKeeper(catalog, store, "run-1", provenance={"seed": 7})
    keeper.begin()
    v1 = register(keeper, 1)
    v2 = register(keeper, 2)
    assert v1.parent_id is None and v2.parent_id == v1.id
    assert catalog.current_version().id == v2.id  # type: ignore[union-attr]
    assert v2.provenance["seed"] == 7 and v2.name
    ckpt = store.load_checkpoint(v2.checkpoint_uri, v2.checkpoint_sha256)
    assert ckpt.round == 2 and ckpt.extra == {"run_id": "run-1"}
    assert torch.equal(ckpt.state_dict["w"], torch.full((2,), 2.0))
    assert v2.checkpoint_uri.endswith("run-1/round-002.pt")


def test_central_dp_spend_goes_into_the_version_not_the_checkpoint(parts) -> None:  # noqa: ANN001
    catalog, store = parts
    keeper = VersionKeeper(catalog, store, "run-1")
    keeper.begin()
    ledger = {"epsilon": 1.25, "delta": 1e-5, "ledger": {"events": 3}}
    version = register(keeper, 1, privacy=ledger)
    assert version.metrics == {"accuracy": 0.5, "central-dp-epsilon": 1.25}
    assert version.provenance[PROVENANCE_KEY] == ledger
    ckpt = store.load_checkpoint(version.checkpoint_uri, version.checkpoint_sha256)
    assert ckpt.metrics == {"accuracy": 0.5}


def test_promote_best_keeps_the_better_version_current_unless_the_head_grew(
    parts,  # noqa: ANN001
) -> None:
    catalog, store = parts
    keeper = VersionKeeper(catalog, store, "run-1", "best")
    keeper.begin()
    v1 = register(keeper, 1, accuracy=0.6)
    v2 = register(keeper, 2, accuracy=0.4)
    assert not v2.is_current and catalog.current_version().id == v1.id  # type: ignore[union-attr]
    assert v2.parent_id == v1.id  # the run continues from its own model
    v3 = register(keeper, 3, accuracy=0.6)  # as good as the best: current
    assert v3.is_current
    v4 = register(keeper, 4, accuracy=0.1, grew=True)
    assert v4.is_current
    with pytest.raises(ValueError, match="promote must be"):
        VersionKeeper(catalog, store, "run-1", "newest")


def test_a_rollback_is_followed_once_with_its_server_state(parts) -> None:  # noqa: ANN001
    catalog, store = parts
    keeper = VersionKeeper(catalog, store, "run-1")
    keeper.begin()
    v1 = register(keeper, 1, server_state=server_state(Adam(3.0)))
    register(keeper, 2, server_state=server_state(Adam(5.0)))
    assert keeper.follow_rollback(Adam(5.0)) is None  # nobody moved it
    catalog.set_current(v1.id)
    adam = Adam(5.0)
    followed = keeper.follow_rollback(adam)
    assert followed is not None
    version, ckpt = followed
    assert version.id == v1.id
    assert torch.equal(ckpt.state_dict["w"], torch.full((2,), 1.0))
    np.testing.assert_array_equal(adam.m_t["w"], [3.0, 3.0])  # type: ignore[index]
    np.testing.assert_array_equal(adam.v_t["w"], [9.0, 9.0])  # type: ignore[index]
    assert keeper.follow_rollback(adam) is None  # followed already
    v3 = register(keeper, 3, parent=v1.id)
    assert v3.parent_id == v1.id and v3.is_current


def test_an_admins_move_during_a_round_wins(parts) -> None:  # noqa: ANN001
    """The admin makes v1 current while round 3 runs: round 3's version is kept
    but not current, and round 4 continues from v1."""
    catalog, store = parts
    keeper = VersionKeeper(catalog, store, "run-1")
    keeper.begin()
    v1 = register(keeper, 1)
    register(keeper, 2)
    catalog.set_current(v1.id)
    assert not register(keeper, 3).is_current
    followed = keeper.follow_rollback()
    assert followed is not None and followed[0].id == v1.id
    assert catalog.current_version().id == v1.id  # type: ignore[union-attr]
    assert register(keeper, 4, parent=v1.id).is_current


def test_a_fresh_run_does_not_roll_back_to_what_an_older_run_left(parts) -> None:  # noqa: ANN001
    catalog, store = parts
    older = VersionKeeper(catalog, store, "run-1")
    older.begin()
    old = register(older, 1)
    keeper = VersionKeeper(catalog, store, "run-2")
    keeper.begin()  # a fresh model: the current version is not a rollback
    assert keeper.follow_rollback() is None
    assert register(keeper, 1).is_current
    resumed = VersionKeeper(catalog, store, "run-3")
    resumed.begin(old.id)  # continuing from v1 while run-2's is current
    followed = resumed.follow_rollback()
    assert followed is not None and followed[0].run_id == "run-2"


def test_server_state_round_trips_and_is_reset_without_one(parts) -> None:  # noqa: ANN001
    catalog, store = parts
    assert server_state(object()) is None and server_state(Adam()) is None
    keeper = VersionKeeper(catalog, store, "run-1")
    keeper.begin()
    with_state = register(keeper, 1, server_state=server_state(Adam(2.0)))
    assert with_state.server_state_uri is not None
    without = register(keeper, 2)
    adam = Adam(9.0)
    keeper.restore_server_state(adam, with_state)
    np.testing.assert_array_equal(adam.m_t["w"], [2.0, 2.0])  # type: ignore[index]
    keeper.restore_server_state(adam, without)
    assert adam.m_t is None and adam.v_t is None  # FedAdam starts its moments over
