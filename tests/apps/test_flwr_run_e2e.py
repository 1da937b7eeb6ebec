"""The real thing: `flwr run .` against a SuperLink these tests start and stop.

Three simulated nodes train the CNN on the committed Fashion-MNIST subset through
Ray; the run must learn (accuracy well above the 10% of chance) and leave its
outputs. A bad run-config value must fail before round 1 with the key named.
"""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedobj.catalog import SyncCatalog
from fedobj.confusion import confusion_from_metrics
from fedobj.model import load_checkpoint
from fedobj.superlink import LocalSuperLink, _alive, descendants
from tests.conftest import FIXTURE_FMNIST, ROOT, free_port, write_image_folder

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory):
    outputs = tmp_path_factory.mktemp("outputs")
    link = LocalSuperLink(
        tmp_path_factory.mktemp("flwr-home"),
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(outputs),
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
        },
    )
    pid = link.start()
    yield link, outputs
    tree = {pid} | descendants(pid)
    assert link.stop()
    left = sorted(p for p in tree if _alive(p))
    assert not left, f"processes left running after stop: {left}"
    assert not link.is_healthy()


def flwr_run(
    link: LocalSuperLink, run_config: str, nodes: int = 3, timeout: int = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        link.run_command(ROOT, nodes, run_config),
        env=link.cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_flwr_run_learns_and_writes_outputs(superlink) -> None:
    link, outputs = superlink
    proc = flwr_run(
        link,
        "num-server-rounds=3 min-nodes=3 fraction-evaluate=1.0 "
        'local-epochs=2 partitioner="iid" norm="group"',
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "round 3/3: 3/3 nodes replied" in log
    run_dir = (outputs / "latest").resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert summary["final_central_accuracy"] > 0.6, summary  # chance is 0.10

    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    rounds = [r for r in rows if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["nodes_replied"] == 3 and r["nodes_failed"] == 0 for r in rounds)
    assert rounds[-1]["central_accuracy"] > rounds[0]["central_accuracy"] - 0.05
    assert len([r for r in rows if r["kind"] == "node-train"]) == 9
    assert len([r for r in rows if r["kind"] == "node-evaluate"]) == 9
    assert rounds[0]["lr"] > rounds[-1]["lr"]  # cosine schedule across rounds

    ckpt = load_checkpoint(run_dir / "round-003.pt")
    assert ckpt.class_map.num_classes == 10 and ckpt.round == 3
    assert ckpt.model_args.norm == "group"
    assert ckpt.metrics["accuracy"] == pytest.approx(summary["final_central_accuracy"])
    catalog = SyncCatalog(outputs / "catalog.db")
    versions = [v for v in catalog.list_versions() if v.run_id == run_dir.name]
    assert sorted(v.round for v in versions) == [1, 2, 3]
    assert catalog.current_version().checkpoint_uri == str(run_dir / "round-003.pt")
    assert summary["final_checkpoint"] == str(run_dir / "round-003.pt")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["run_config"]["num-server-rounds"] == 3 and info["seed"] == 42
    assert info["packages"]["flwr"] == version("flwr") and info["code_revision"]
    assert (run_dir / "accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "override,key",
    [
        ("num-server-rounds=0", "num-server-rounds"),
        ('model="resnet"', "model"),
        ("fraction-train=1.5", "fraction-train"),
    ],
)
def test_bad_run_config_fails_before_round_one(
    superlink, override: str, key: str
) -> None:
    link, _ = superlink
    proc = flwr_run(link, override, nodes=2, timeout=200)
    log = proc.stdout + proc.stderr
    assert f"run config `{key}`" in log, log[-3000:]
    assert "[ROUND 1" not in log


def test_two_runs_of_one_seed_end_in_the_same_model(superlink) -> None:
    """Repeatable simulations: same seed, same bits. Flower draws the node ids
    afresh and the replies arrive in a race; neither may reach the model
    (training seeds come from the partition, sums run in a canonical order)."""
    link, outputs = superlink
    states = []
    for _ in range(2):
        proc = flwr_run(
            link,
            "num-server-rounds=2 min-nodes=3 fraction-evaluate=1.0 seed=7 "
            'partitioner="iid"',
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        ckpt = load_checkpoint((outputs / "latest").resolve() / "round-002.pt")
        states.append({k: v.numpy().tobytes() for k, v in ckpt.state_dict.items()})
    assert states[0].keys() == states[1].keys()
    differ = [k for k in states[0] if states[0][k] != states[1][k]]
    assert not differ, f"arrays that differ between the two runs: {differ}"


def test_a_retired_key_fails_before_round_one(superlink) -> None:
    """The SuperLink refuses a key the app no longer declares before any run
    starts; Flower 1.41 says only "Invalid run configuration", so ``fedobj run``
    and ``make demo`` check the keys first and name the retired one
    (tests/fedobj/test_config_cli_outputs.py)."""
    link, _ = superlink
    proc = flwr_run(link, 'num-server-rounds=2 head-align="norm"', nodes=2, timeout=200)
    log = proc.stdout + proc.stderr
    assert "Invalid run configuration" in log, log[-3000:]
    assert "Successfully started run" not in log and "round 1/" not in log


def test_versions_get_their_accuracy_from_the_servers_folder(
    superlink, tmp_path: Path
) -> None:
    """``central-eval-dir``: the server scores each round's model on its own
    folder (three categories of the catalog and one it does not know): every
    version carries the folder's accuracy, per-class accuracy and confusion
    matrix (the 12 images of the three known categories, nothing else)."""
    link, outputs = superlink
    root = write_image_folder(tmp_path / "eval", per_class=4, classes=3)
    (root / "unicorn").mkdir()
    stray = next((root / "trouser").glob("*.png"))
    (root / "unicorn" / stray.name).write_bytes(stray.read_bytes())
    proc = flwr_run(
        link,
        f'num-server-rounds=2 min-nodes=2 central-eval-dir="{root}" promote="best"',
        nodes=2,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "skipping unicorn (not categories of the catalog)" in log, log[-4000:]
    assert "central evaluation on" in log and "12 images of 3 categories" in log
    assert "central accuracy n/a" not in log
    run_dir = (outputs / "latest").resolve()
    catalog = SyncCatalog(outputs / "catalog.db")
    versions = [v for v in catalog.list_versions() if v.run_id == run_dir.name]
    assert sorted(v.round for v in versions) == [1, 2]
    for v in versions:
        assert v.accuracy is not None and 0.0 <= v.accuracy <= 1.0
        per_class = {k for k in v.metrics if k.startswith("class-")}
        assert per_class == {f"class-{k}-accuracy" for k in range(3)}, v.metrics
        classes, matrix = confusion_from_metrics(v.metrics)
        assert sum(map(sum, matrix)) == 12 and set(classes) >= {0, 1, 2}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_central_accuracy"] is not None
