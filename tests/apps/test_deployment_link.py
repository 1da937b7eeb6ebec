"""The edge link on real SuperNodes: a SuperLink and two `flower-supernode`
processes on 127.0.0.1, each over its own image folder and with its own
`device-id`, train with top-k updates (error feedback) and int8 downlink deltas,
and score the model they receive inside the train message (evaluate-on-arrival:
one message per node and round).

Each ClientApp is a fresh process per message, so everything the link keeps
between rounds must be on the device's disk: the residual and the held model,
under its cache folder and device id (a real device's, so not per run).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.apps.test_deployment import deploy_run
from tests.apps.test_faults import federation
from tests.conftest import write_image_folder

pytestmark = pytest.mark.deployment


def test_supernodes_train_with_compressed_updates_and_deltas(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        for i in range(2):
            root = write_image_folder(
                tmp_path / f"device{i}", per_class=40, offset=40 * i
            )
            fed.add_supernode(root, device_id=f"board-{i}")
        run = deploy_run(
            fed.env,
            "num-server-rounds=3 min-nodes=2 fraction-evaluate=1.0 local-epochs=2 "
            'update-compression="topk" topk-fraction=0.1 downlink-compression="int8" '
            "evaluate-on-arrival=true",
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        assert "round 3/3: 2/2 nodes replied" in log, log[-4000:]
    outputs = fed.outputs
    for i in range(2):  # a real device's state: its id, no run scope
        state = tmp_path / f"cache{i}" / "link"
        assert (state / f"board-{i}.residual.npz").is_file()
        assert (state / f"board-{i}.held.npz").is_file()
    rows = pq.read_table((outputs / "latest" / "metrics.parquet").resolve()).to_pylist()
    train = [r for r in rows if r["kind"] == "node-train"]
    assert len(train) == 6 and all(r["up_bytes"] for r in train)
    first = max(r["down_bytes"] for r in train if r["round"] == 1)  # whole model
    later = max(r["down_bytes"] for r in train if r["round"] > 1)  # int8 deltas
    assert first / later > 3.5, (first, later)
    assert first / max(r["up_bytes"] for r in train) > 15  # top-k 10%
    scored = [r for r in rows if r["kind"] == "node-evaluate"]
    assert len(scored) == 6 and all(r["num_examples"] for r in scored)
    rounds = [r for r in rows if r["kind"] == "round"]
    # each round's federated figure is its starting model's: round 1 scores the
    # untrained model, round 3 the model two rounds trained
    assert rounds[0]["accuracy"] < rounds[2]["accuracy"], rounds
    assert rounds[-1]["nodes_replied"] == 2 and rounds[-1]["nodes_failed"] == 0
    assert rounds[-1]["central_accuracy"] > 0.3, rounds  # chance is 0.10
