"""A node's training seed comes from its stable identity, not Flower's node id
(drawn afresh in every simulation): two runs of one ``seed`` must shuffle alike."""

from __future__ import annotations

from apps.client_app import train_seed
from fedobj import keys


def test_the_same_partition_trains_with_the_same_seed_under_any_node_id() -> None:
    sim = {keys.NODE_PARTITION_ID: 3}
    assert train_seed(42, 2, sim, node_id=123) == train_seed(42, 2, sim, node_id=9)
    others = {
        train_seed(42, 2, {keys.NODE_PARTITION_ID: p}, node_id=5) for p in range(100)
    }
    assert len(others) == 100  # every node shuffles its own way
    every = {
        train_seed(42, r, {keys.NODE_PARTITION_ID: p}, node_id=5)
        for p in range(200)
        for r in range(1, 51)
    }
    assert len(every) == 200 * 50  # no node's round repeats another's shuffle
    assert all(0 <= s < 2**63 for s in every)  # what torch.Generator takes
    assert train_seed(42, 3, sim, 5) != train_seed(42, 2, sim, 5)  # and every round
    assert train_seed(43, 2, sim, 5) != train_seed(42, 2, sim, 5)


def test_a_device_id_outranks_the_partition_and_the_node_id_is_the_last_resort() -> (
    None
):
    device = {keys.NODE_DEVICE_ID: "cam-7", keys.NODE_PARTITION_ID: 3}
    assert train_seed(1, 1, device, 5) == train_seed(
        1, 1, {keys.NODE_DEVICE_ID: "cam-7"}, 6
    )
    assert train_seed(1, 1, device, 5) != train_seed(
        1, 1, {keys.NODE_PARTITION_ID: 3}, 5
    )
    assert train_seed(1, 1, {}, 5) != train_seed(1, 1, {}, 6)
