"""A failed run fails its command: `fedobj run` (what `make demo` and the
deployment script call) and `make demo` exit non-zero with the run's error in one
line, and never show another run's results as this one's (a killed ServerApp is
checked in test_resume_continues.py).

`flwr run --stream` itself returns 0 for every one of these (Flower 1.41/1.42).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedobj.adminproc import FEDOBJ
from fedobj.catalog import SyncCatalog
from fedobj.superlink import LocalSuperLink
from tests.apps.test_flwr_run_e2e import superlink  # noqa: F401  (fixture)
from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def fedobj_run(
    link: LocalSuperLink, run_config: str, outputs: Path, nodes: int = 2
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FEDOBJ, "run", "--app", str(ROOT), "--outputs", str(outputs)]
        + ["--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1"]
        + ["--run-config", run_config],
        cwd=ROOT,
        env=link.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_bad_run_config_value_fails_the_command(superlink) -> None:  # noqa: F811
    link, outputs = superlink
    proc = fedobj_run(link, 'model="nope" num-server-rounds=1', outputs)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "failed" in lines[0], err
    assert "model" in lines[0] and "must be one of" in lines[0], lines
    assert "final central accuracy" not in out  # no table, no older run's either


def test_make_demo_with_a_bad_value_exits_non_zero_without_a_table(
    tmp_path: Path,
) -> None:
    env = dict(os.environ)
    env.pop("MAKEFLAGS", None)
    done = subprocess.run(
        [
            "make",
            "demo",
            f"SUPERLINK_PORT={free_port()}",
            f"CONTROL_PORT={free_port()}",
            f"FLWR_HOME={tmp_path / 'flwr'}",
            f"FEDOBJ_OUTPUTS_DIR={tmp_path / 'outputs'}",
            "FEDERATION=num-supernodes=2 client-resources-num-cpus=1",
            'RUN_CONFIG=model="nope" num-server-rounds=1',
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    assert "must be one of" in done.stderr, done.stderr[-2000:]
    assert "final central accuracy" not in done.stdout


def test_a_full_registry_disk_fails_the_run_with_the_path(
    superlink,  # noqa: F811
    tmp_path: Path,
) -> None:
    from tests.fedobj.catalog.faults import small_tmpfs

    link, outputs = superlink
    db = tmp_path / "catalog.db"
    with small_tmpfs(tmp_path / "disk", size="1m") as disk:
        registry = disk / "registry"
        proc = fedobj_run(
            link,
            f'num-server-rounds=2 database-url="sqlite:///{db}" min-nodes=2 '
            f'registry-uri="{registry}"',
            outputs,
        )
        out, err = proc.communicate(timeout=400)
    assert proc.returncode == 1, out[-2000:] + err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "no space left on device" in line and str(registry) in line, line
    run = SyncCatalog(db).list_run_records()[0]
    assert run.status == "failed" and "no space left" in (run.error or "")
    assert SyncCatalog(db).list_versions() == []  # no version without its file
