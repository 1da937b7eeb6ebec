"""Rounds, nodes (and forgetting them), and the run lease."""

from __future__ import annotations

import pytest

from fedobj.catalog import (
    CatalogValueError,
    LeaseHeldError,
    NotFoundError,
    SyncCatalog,
)
from tests.fedobj.catalog.helpers import FakeClock


def test_rounds_and_runs(catalog: SyncCatalog) -> None:
    started = catalog.start_round("run-a", 1, sampled=4)
    assert (started.status, started.nodes_sampled, started.completed_at) == (
        "in_progress",
        4,
        None,
    )
    done = catalog.finish_round(
        "run-a", 1, replied=3, rejected=1, accuracy=0.7, loss=float("nan")
    )
    assert (done.status, done.nodes_replied, done.nodes_rejected) == ("completed", 3, 1)
    assert (done.central_accuracy, done.central_loss) == (0.7, None)
    assert done.started_at == started.started_at and done.completed_at is not None

    catalog.start_round("run-a", 2, sampled=4)
    catalog.finish_round("run-a", 2, replied=0, rejected=4, status="failed")
    again = catalog.start_round("run-a", 2, sampled=5)  # a resumed run replays it
    assert (again.status, again.nodes_sampled, again.nodes_rejected) == (
        "in_progress",
        5,
        0,
    )
    catalog.start_round("run-b", 1, sampled=2)

    assert [r.round for r in catalog.rounds("run-a")] == [1, 2]
    runs = {r.run_id: r for r in catalog.list_runs()}
    assert (runs["run-a"].rounds, runs["run-a"].last_round) == (2, 2)
    assert runs["run-a"].last_status == "in_progress"
    assert runs["run-b"].rounds == 1
    with pytest.raises(CatalogValueError):
        catalog.finish_round("run-a", 1, replied=0, rejected=0, status="exploded")


def test_nodes_and_node_rounds(catalog: SyncCatalog) -> None:
    node = catalog.upsert_node(2**63 + 5, samples=100, label_names=["bag", "coat"])
    assert (node.node_id, node.samples, node.label_names) == (
        str(2**63 + 5),
        100,
        ["bag", "coat"],
    )
    seen = catalog.upsert_node(2**63 + 5, samples=120, label_names=["bag"])
    assert (seen.samples, seen.label_names) == (120, ["bag"])
    kept = catalog.upsert_node(2**63 + 5, samples=130, status="idle")
    assert (kept.samples, kept.label_names, kept.status) == (130, ["bag"], "idle")
    assert catalog.upsert_node("new", samples=1).label_names == []
    assert kept.dp_epsilon is None
    spent = catalog.upsert_node(2**63 + 5, samples=130, dp_epsilon=1.25)
    assert spent.dp_epsilon == 1.25
    assert catalog.upsert_node(2**63 + 5, samples=130).dp_epsilon == 1.25  # kept
    assert len(catalog.list_nodes()) == 2

    catalog.record_node_round("r", 1, 7, "train", num_examples=50, loss=0.5)
    catalog.record_node_round("r", 1, 7, "evaluate", num_examples=10, accuracy=0.9)
    catalog.record_node_round("r", 2, 8, "train", error="reply had NaN weights")
    assert [(n.kind, n.loss, n.accuracy) for n in catalog.node_rounds("r", 1)] == [
        ("train", 0.5, None),
        ("evaluate", None, 0.9),
    ]
    assert catalog.node_rounds("r", 2)[0].error == "reply had NaN weights"
    assert len(catalog.node_rounds("r")) == 3
    with pytest.raises(CatalogValueError):
        catalog.record_node_round("r", 1, 7, "predict")


def test_forget_node(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a"])
    catalog.register_version(
        run_id="r",
        round=1,
        class_map=catalog.snapshot(),
        metrics={"accuracy": 0.5},
        checkpoint_uri="file:///c",
        checkpoint_sha256="00",
    )
    for node_id in ("n1", "n2"):
        catalog.upsert_node(node_id, samples=10, label_names=["a"])
        catalog.record_node_round("r", 1, node_id, "train", num_examples=10)
        catalog.record_node_round("r", 1, node_id, "evaluate", num_examples=2)

    assert catalog.forget_node("n1") == 3  # two metric rows and the node row
    with pytest.raises(NotFoundError):
        catalog.get_node("n1")
    assert {n.node_id for n in catalog.node_rounds("r", 1)} == {"n2"}
    assert catalog.get_node("n2").samples == 10
    assert len(catalog.list_versions()) == 1  # versions stay
    assert catalog.forget_node("n1") == 0  # idempotent


@pytest.fixture
def clocked(catalog_url: str) -> tuple[SyncCatalog, FakeClock]:
    clock = FakeClock()
    return SyncCatalog(catalog_url, clock=clock), clock


def test_lease_refused_while_held(clocked: tuple[SyncCatalog, FakeClock]) -> None:
    catalog, clock = clocked
    assert catalog.lease().holder is None
    held = catalog.acquire_lease("run-a", ttl_s=60)
    assert held.holder == "run-a" and held.expires_at is not None
    with pytest.raises(LeaseHeldError, match="run-a"):
        catalog.acquire_lease("run-b", ttl_s=60)
    assert catalog.acquire_lease("run-a", ttl_s=60).holder == "run-a"  # re-entrant
    clock.advance(50)
    renewed = catalog.renew_lease("run-a", ttl_s=60)  # heartbeat
    clock.advance(50)  # 100 s after acquiring, 50 s after the heartbeat
    with pytest.raises(LeaseHeldError):
        catalog.acquire_lease("run-b", ttl_s=60)
    assert catalog.lease() == renewed


def test_expired_lease_is_taken_over(clocked: tuple[SyncCatalog, FakeClock]) -> None:
    catalog, clock = clocked
    catalog.acquire_lease("run-a", ttl_s=30)
    clock.advance(31)  # run-a died and stopped renewing
    assert catalog.acquire_lease("run-b", ttl_s=30).holder == "run-b"
    with pytest.raises(LeaseHeldError, match="lost"):
        catalog.renew_lease("run-a", ttl_s=30)
    assert not catalog.release_lease("run-a")  # not its lease any more
    assert catalog.release_lease("run-b")
    assert catalog.lease().holder is None
    assert catalog.acquire_lease("run-c", ttl_s=30).holder == "run-c"


def test_force_takes_a_live_lease(clocked: tuple[SyncCatalog, FakeClock]) -> None:
    catalog, _ = clocked
    catalog.acquire_lease("run-a", ttl_s=3600)
    assert catalog.acquire_lease("run-b", ttl_s=60, force=True).holder == "run-b"
    with pytest.raises(CatalogValueError):
        catalog.acquire_lease("run-c", ttl_s=0)


def test_lease_with_real_clock(catalog: SyncCatalog) -> None:
    """Expiry compared by the database, with real timestamps, on both engines."""
    import time

    catalog.acquire_lease("run-a", ttl_s=0.05)
    time.sleep(0.1)
    assert catalog.acquire_lease("run-b", ttl_s=60).holder == "run-b"


@pytest.mark.parametrize("force", [False, True])
def test_taking_over_a_dead_runs_lease_closes_its_open_round(
    clocked: tuple[SyncCatalog, FakeClock], force: bool
) -> None:
    catalog, clock = clocked
    catalog.acquire_lease("run-a", ttl_s=30)
    catalog.begin_run(
        "run-a", strategy="fedavg", model="cnn", first_round=1, last_round=5
    )
    catalog.start_round("run-a", 1, 3)
    catalog.finish_round("run-a", 1, replied=3, rejected=0)
    catalog.start_round("run-a", 2, 3)  # the process dies here
    if not force:
        clock.advance(31)  # its lease expires
    catalog.acquire_lease("run-b", ttl_s=30, force=force)
    statuses = [(r.round, r.status) for r in catalog.rounds("run-a")]
    assert statuses == [(1, "completed"), (2, "failed")]
    lost = catalog.get_run("run-a")
    assert lost.status == "failed" and lost.error == "run lost its lease"


def test_a_refused_lease_names_what_to_wait_for(
    clocked: tuple[SyncCatalog, FakeClock],
) -> None:
    from apps.run_lease import held_lease

    catalog, _ = clocked
    catalog.acquire_lease("run-a", ttl_s=60)
    with pytest.raises(LeaseHeldError, match="allow-concurrent-runs=true"):  # noqa: SIM117
        with held_lease(catalog, "run-b", 60):
            pass
    assert catalog.rounds("run-a") == []  # a refusal closes nothing
