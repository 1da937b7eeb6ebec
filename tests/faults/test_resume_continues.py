"""A crashed run resumes to the same model: the ServerApp SIGKILLed in round 3 of
5, then `resume=true` with the same run config, ends in the weights of an
uninterrupted run of the same seed — every completed round number once, the
versions one unbroken parent chain, the learning-rate schedule the original one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fedobj.catalog import SyncCatalog
from fedobj.model import load_checkpoint
from fedobj.superlink import LocalSuperLink, descendants
from tests.apps.test_flwr_run_e2e import flwr_run, superlink  # noqa: F401
from tests.faults.test_run_exit_codes import fedobj_run

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

CONFIG = (
    'num-server-rounds=5 min-nodes=2 fraction-evaluate=1.0 seed=11 partitioner="iid"'
)


def kill_serverapp(link: LocalSuperLink) -> None:
    pids = [
        p
        for p in descendants(link._read_pid() or 0)
        if b"flwr-simulation" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert pids, "no flwr-simulation process under the SuperLink"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def bits(checkpoint_uri: str) -> dict[str, bytes]:
    state = load_checkpoint(checkpoint_uri).state_dict
    return {k: v.numpy().tobytes() for k, v in state.items()}


def test_a_run_killed_in_round_3_resumes_to_the_uninterrupted_model(
    superlink,  # noqa: F811
    tmp_path: Path,
) -> None:
    link, outputs = superlink
    whole_db, cut_db = tmp_path / "whole.db", tmp_path / "cut.db"
    whole = flwr_run(link, f'{CONFIG} database-url="sqlite:///{whole_db}"', nodes=2)
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]
    reference = SyncCatalog(whole_db).current_version()
    assert reference is not None and reference.round == 5

    proc = fedobj_run(link, f'{CONFIG} database-url="sqlite:///{cut_db}"', outputs)
    catalog = SyncCatalog(cut_db)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(
                r.round == 3 and r.status == "in_progress"
                for run in catalog.list_runs()
                for r in catalog.rounds(run.run_id)
            ):
                break
        except Exception:  # still creating the catalog
            pass
        time.sleep(0.05)
    kill_serverapp(link)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err  # the launcher tells the truth

    # the dead run still holds the lease: the README's way is this key
    resumed = fedobj_run(
        link,
        f'{CONFIG} database-url="sqlite:///{cut_db}" resume=true '
        "allow-concurrent-runs=true",
        outputs,
    )
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:] + err

    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    assert [v.round for v in versions] == [1, 2, 3, 4, 5]  # each round once
    for parent, child in zip(versions, versions[1:]):
        assert child.parent_id == parent.id  # one unbroken chain
    completed = [
        r.round
        for run in catalog.list_runs()
        for r in catalog.rounds(run.run_id)
        if r.status == "completed"
    ]
    assert sorted(completed) == [1, 2, 3, 4, 5]
    first_run = catalog.get_run(versions[0].run_id)
    assert first_run.status == "failed" and first_run.error  # closed, with why

    expected, got = bits(reference.checkpoint_uri), bits(versions[-1].checkpoint_uri)
    differ = [k for k in expected if expected[k] != got[k]]
    assert not differ, f"arrays that differ from the uninterrupted run: {differ}"
