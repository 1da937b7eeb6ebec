"""Class growth, rollback and resume through a real `flwr run` (Ray simulation).

Each test gives its run its own SQLite catalog (run config `database-url`) and edits
it from here, through the same catalog functions the admin API calls, while the run
goes on. An edit takes effect at the start of the next round (contract 3), so the
assertions say "a later round", not "round 2".
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from fedobj.catalog import SyncCatalog
from fedobj.data.categories import FASHION_MNIST_NAMES
from fedobj.superlink import LocalSuperLink
from tests.apps.test_flwr_run_e2e import superlink  # noqa: F401  (fixture)
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def start_run(link: LocalSuperLink, db: Path, extra: str) -> subprocess.Popen[str]:
    run_config = (
        f'database-url="sqlite:///{db}" min-nodes=2 fraction-evaluate=1.0 '
        f'partitioner="iid" {extra}'
    )
    return subprocess.Popen(
        link.run_command(ROOT, 2, run_config),
        env=link.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_round(
    catalog: SyncCatalog,
    round_: int,
    proc: subprocess.Popen[str],
    timeout_s: float = 300,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended early: " + (
            proc.stdout.read() if proc.stdout else ""
        )
        try:
            done = [v for v in catalog.list_versions() if v.round >= round_]
        except Exception:  # the run may still be creating the database
            done = []
        if done:
            return
        time.sleep(0.2)
    raise TimeoutError(f"round {round_} did not finish in {timeout_s} s")


def finish(proc: subprocess.Popen[str], timeout_s: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_category_added_mid_run_grows_the_head(superlink, tmp_path: Path) -> None:  # noqa: F811
    link, _ = superlink
    db = tmp_path / "growth.db"
    # with head calibration on: its statistics travel in the evaluate exchange
    proc = start_run(
        link,
        db,
        'num-server-rounds=4 initial-categories=6 head-calibration="virtual-features"',
    )
    catalog = SyncCatalog(db)
    wait_for_round(catalog, 1, proc)
    for name in FASHION_MNIST_NAMES[6:]:  # what `POST /categories` will do
        catalog.add_category(name)
    log = finish(proc)

    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    assert [v.round for v in versions] == [1, 2, 3, 4]
    sizes = [v.class_map.num_classes for v in versions]
    assert sizes[0] == 6 and sizes[-1] == 10 and sizes == sorted(sizes), sizes
    # the four adds are four edits: a round's snapshot may fall between them, so
    # the head may grow in steps (6->9, then 9->10), never shrink, never skip a round
    assert "head grew 6->" in log and "->10" in log, log[-3000:]
    assert "round 1: head calibrated on 1200 virtual features of 6 classes" in log
    assert "round 4: head calibrated on 2000 virtual features of 10 classes" in log
    assert "(statistics from 2 nodes)" in log, log[-3000:]
    final = catalog.current_version()
    assert final is not None and final.round == 4
    from fedobj.model import load_checkpoint

    ck = load_checkpoint(final.checkpoint_uri)
    assert ck.state_dict["classifier.weight"].shape[0] == 10
    assert [e.slug for e in ck.class_map.entries][6:] == [
        "shirt",
        "sneaker",
        "bag",
        "ankle-boot",
    ]
    assert ck.class_map.slug_to_index["ankle-boot"] == 9
    rounds = catalog.rounds(versions[0].run_id)
    assert [r.status for r in rounds] == ["completed"] * 4


def test_rollback_mid_run_is_honoured_and_resume_continues(
    superlink,  # noqa: F811
    tmp_path: Path,
) -> None:
    link, _ = superlink
    db = tmp_path / "rollback.db"
    proc = start_run(link, db, "num-server-rounds=4")
    catalog = SyncCatalog(db)
    wait_for_round(catalog, 2, proc)
    v1 = next(v for v in catalog.list_versions() if v.round == 1)
    catalog.set_current(v1.id)  # what `POST /versions/{id}/rollback` will do
    log = finish(proc)
    later = [v for v in catalog.list_versions() if v.round >= 3]
    assert any(v.parent_id == v1.id for v in later), [
        (v.round, v.parent_id) for v in later
    ]
    assert f"continued from rolled-back version {v1.name}" in log

    # a new run with resume=true continues from the current version's round
    last = catalog.current_version()
    assert last is not None
    proc = start_run(link, db, "num-server-rounds=1 resume=true")
    log = finish(proc)
    resumed = catalog.current_version()
    assert resumed is not None and resumed.round == last.round + 1
    assert resumed.parent_id == last.id and resumed.run_id != last.run_id
    assert f"resuming from version {last.name}" in log
