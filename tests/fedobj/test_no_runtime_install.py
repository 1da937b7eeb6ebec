"""Every launcher of ours starts Flower without its per-run dependency installation.

A SuperLink started without ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` runs
``uv sync`` for every run: 6 GB under ``$FLWR_HOME/runtime-envs/<run>`` (torch
downloaded again on a device). Each launcher is run here as a user runs it, with
stand-ins for Flower's programs that write down the environment they were given;
a value the user set is kept, whatever it is.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedobj.launch import launch
from fedobj.superlink import NO_RUNTIME_INSTALL, LocalSuperLink, no_runtime_install
from tests.conftest import ROOT, write_image_folder

# what the user's environment holds (None: unset) -> what Flower must be given
CASES = [(None, "1"), ("", "1"), ("1", "1"), ("0", "0")]


def _recorder(path: Path, dump: Path) -> Path:
    """An executable at ``path`` that writes its environment to ``dump`` and
    fails (a stand-in for flwr, flower-superlink or flower-supernode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nenv > "{dump}"\nexit 3\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _given(dump: Path) -> str | None:
    """The variable's value in a recorded environment (None: not set)."""
    for line in dump.read_text().splitlines():
        name, _, value = line.partition("=")
        if name == NO_RUNTIME_INSTALL:
            return value
    return None


def _user_env(value: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != NO_RUNTIME_INSTALL}
    if value is not None:
        env[NO_RUNTIME_INSTALL] = value
    return env


@pytest.mark.parametrize(("user", "expected"), CASES)
def test_the_local_superlink_and_flwr_run_get_it(
    user: str | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert no_runtime_install(_user_env(user))[NO_RUNTIME_INSTALL] == expected
    monkeypatch.delenv(NO_RUNTIME_INSTALL, raising=False)
    if user is not None:
        monkeypatch.setenv(NO_RUNTIME_INSTALL, user)
    link = LocalSuperLink(tmp_path / "flwr")
    assert link.cli_env()[NO_RUNTIME_INSTALL] == expected
    # `fedobj run` (launch): a `flwr run` that finds no SuperLink starts one itself
    dump = tmp_path / "flwr.env"
    bin_dir = _recorder(tmp_path / "bin" / "flwr", dump).parent
    env = _user_env(user)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    outcome = launch(["."], env, echo=None)
    assert outcome.run_id is None and outcome.status == "not started"
    assert _given(dump) == expected


@pytest.mark.parametrize(("user", "expected"), CASES)
def test_the_board_launcher_gives_it_to_the_supernode(
    user: str | None, expected: str, tmp_path: Path
) -> None:
    dump = tmp_path / "supernode.env"
    fake = _recorder(tmp_path / "flower-supernode", dump)
    data = write_image_folder(tmp_path / "photos", per_class=1, classes=1)
    done = subprocess.run(
        [sys.executable, str(ROOT / "mobile" / "run_supernode.py")]
        + ["--superlink", "127.0.0.1:9092", "--insecure", "--data-dir", str(data)]
        + ["--cache-dir", str(tmp_path / "cache"), "--supernode-bin", str(fake)],
        env=_user_env(user),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr  # the stand-in ran in its place
    assert _given(dump) == expected


@pytest.mark.parametrize(("user", "expected"), CASES)
def test_the_deployment_script_gives_it_to_the_superlink(
    user: str | None, expected: str, tmp_path: Path
) -> None:
    """conf/deploy/run_local.sh up to its SuperLink, which here exits at once (the
    script then stops, as it does when a SuperLink does not start)."""
    venv, deploy, dump = tmp_path / "venv", tmp_path / "deploy", tmp_path / "sl.env"
    _recorder(venv / "bin" / "flower-superlink", dump)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    keys = deploy / "keys"
    keys.mkdir(parents=True)
    for name in ("ca.crt", "superlink.key", "supernode-1.key"):
        (keys / name).write_text("")  # present: the script reuses them
    (tmp_path / "data" / "device-1").mkdir(parents=True)
    env = _user_env(user)
    env.update(
        VENV=str(venv),
        DEPLOY_DIR=str(deploy),
        DATA_ROOT=str(tmp_path / "data"),
        NODES="1",
    )
    done = subprocess.run(
        ["bash", str(ROOT / "conf" / "deploy" / "run_local.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "SuperLink did not start" in done.stderr
    assert _given(dump) == expected


@pytest.mark.parametrize(("user", "expected"), CASES)
def test_make_exports_it_to_every_recipe(user: str | None, expected: str) -> None:
    show = f'show-it: ; @echo "[$${NO_RUNTIME_INSTALL}]"'
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), "--eval", show]
        + ["show-it"],
        env=_user_env(user),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"[{expected}]"
