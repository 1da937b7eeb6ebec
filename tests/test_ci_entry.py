"""The CI entry point parses and runs the same `make test` a developer runs.

A stray paste into `.ci/run` once made bash stop with "unexpected EOF" before any
test ran; CI then failed in 0 s on every later commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"


def test_ci_run_is_valid_bash() -> None:
    done = subprocess.run(
        ["bash", "-n", str(CI_RUN)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def test_ci_run_ends_in_make_test_under_ci_true() -> None:
    lines = [
        line.strip()
        for line in CI_RUN.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "export CI=true" in lines
    assert lines[-1] == "make test"
