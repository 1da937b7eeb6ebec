"""The edge link for real: `flwr run .` with compressed updates, in a Ray
simulation on a SuperLink this module starts and stops.

Each mode must learn as the dense run does (the e2e bar: central accuracy above
0.6 after 3 rounds on the committed subset), and its replies must cost what the
mode promises, counted as Flower counts a message (``up_bytes`` per node-round
in metrics.parquet). Top-k's residuals must be on the simulated devices' disk,
scoped to the run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedobj.model import load_checkpoint
from fedobj.superlink import LocalSuperLink, _alive, descendants
from tests.conftest import FIXTURE_FMNIST, ROOT, free_port

pytestmark = pytest.mark.e2e

BASE = 'num-server-rounds=3 min-nodes=3 local-epochs=2 partitioner="iid"'


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory):
    outputs = tmp_path_factory.mktemp("outputs")
    cache = tmp_path_factory.mktemp("cache")
    link = LocalSuperLink(
        tmp_path_factory.mktemp("flwr-home"),
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(outputs),
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
            "FEDOBJ_CACHE_DIR": str(cache),
        },
    )
    pid = link.start()
    yield link, outputs, cache
    tree = {pid} | descendants(pid)
    assert link.stop()
    left = sorted(p for p in tree if _alive(p))
    assert not left, f"processes left running after stop: {left}"


def _run(link: LocalSuperLink, outputs: Path, extra: str) -> tuple[dict, list[dict]]:
    proc = subprocess.run(
        link.run_command(ROOT, 3, f"{BASE} {extra}"),
        env=link.cli_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "round 3/3: 3/3 nodes replied" in log, log[-4000:]
    assert "kB up /" in log and "kB down per node" in log  # the round line says
    run_dir = (outputs / "latest").resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    return summary, rows


def _dense_bytes(summary: dict) -> int:
    ckpt = load_checkpoint(Path(summary["final_checkpoint"]))
    return sum(4 * v.numel() for v in ckpt.state_dict.values())


@pytest.mark.parametrize(
    "mode,at_least",
    [
        ('update-compression="int8"', 3.9),
        ('update-compression="topk" topk-fraction=0.1', 15.0),
        ('update-compression="int8" downlink-compression="int8"', 3.9),
    ],
    ids=["int8", "topk", "int8-downlink"],
)
def test_a_compressed_run_learns_and_sends_fewer_bytes(
    superlink, mode: str, at_least: float
) -> None:
    link, outputs, cache = superlink
    summary, rows = _run(link, outputs, mode)
    assert summary["final_central_accuracy"] > 0.6, summary  # chance is 0.10
    dense = _dense_bytes(summary)
    train = [r for r in rows if r["kind"] == "node-train"]
    assert len(train) == 9 and all(r["up_bytes"] for r in train)
    worst = max(r["up_bytes"] for r in train)
    assert dense / worst >= at_least, (dense, worst)
    down = [r["down_bytes"] for r in train]
    if "downlink" in mode:
        # round 1 sends the model whole; from round 2 on, an int8 delta
        first = [r["down_bytes"] for r in train if r["round"] == 1]
        later = [r["down_bytes"] for r in train if r["round"] > 1]
        assert min(first) > dense and dense / max(later) >= 3.9, (first, later)
    else:
        assert min(down) > dense  # the model, whole
    if "topk" in mode:
        residuals = list((cache / "link" / "runs").glob("*/sim-*.residual.npz"))
        assert len(residuals) >= 3, residuals
