"""Start a run with ``flwr run --stream`` and exit by how *that run* ended.

``flwr run --stream`` (Flower 1.41 and 1.42) streams the run's logs and returns 0
whatever the end: a ServerApp exception, a killed process, a refused lease. Every
launcher of ours (``make demo``, ``conf/deploy/run_local.sh``, the scenario and
benchmark scripts) goes through :func:`launch`, which reads the run's id from
Flower's "Successfully started run N", waits for the SuperLink to report the
run finished (``flwr ls --run-id N --format json``) and returns a
:class:`RunOutcome` that says completed or failed, and why in one line: the
error the ServerApp logged, else Flower's own status details.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from fedobj.superlink import no_runtime_install

STARTED = re.compile(r"Successfully started run (\d+)")
# what our ServerApp logs on the way down ("ERROR fedobj: <message>"), and
# Flower's own error lines; ANSI colour codes are stripped first
OUR_ERROR = re.compile(r"^\s*ERROR fedobj[\w.]*:\s*(.+)$")
FLOWER_ERROR = re.compile(r"^\s*ERROR\s*:\s*(.+)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STATUS_WAIT_S = 90.0
"""How long the SuperLink may take to mark a run finished after ``flwr run``
returns: it notices a dead ServerApp by its missing heartbeat, up to 60 s
(``HEARTBEAT_PATIENCE`` 2 x ``HEARTBEAT_DEFAULT_INTERVAL`` 30 s) after the last
one, which may fall just before ``flwr run`` lost its stream; 30 s more for
polling and a SuperLink restart."""


@dataclass(frozen=True)
class RunOutcome:
    """How one ``flwr run`` ended."""

    run_id: int | None
    status: str  # "finished:completed", "finished:failed", ... or "not started"
    reason: str  # one line; empty when completed

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    def describe(self) -> str:
        if self.completed:
            return f"run {self.run_id} completed"
        if self.run_id is None:
            return f"flwr run did not start a run: {self.reason}"
        return f"run {self.run_id} {self.status.split(':')[-1]}: {self.reason}"


def error_of(line: str) -> tuple[bool, str] | None:
    """``(ours, message)`` for a log line that reports an error, else None;
    ``ours``: the ServerApp's own line, which names the cause (Flower's lines
    after it say only that the ServerApp raised)."""
    plain = ANSI.sub("", line)
    if match := OUR_ERROR.match(plain):
        return True, match.group(1).strip()
    if match := FLOWER_ERROR.match(plain):
        return False, match.group(1).strip()
    return None


def run_status(
    connection: str | None,
    run_id: int,
    env: Mapping[str, str],
    wait_s: float = STATUS_WAIT_S,
) -> tuple[str, str]:
    """``(status, details)`` of a run as the SuperLink reports it, waiting up to
    ``wait_s`` for it to finish; ``("unknown", why)`` if it cannot be read."""
    cmd = ["flwr", "ls", *([connection] if connection else [])]
    cmd += ["--run-id", str(run_id), "--format", "json"]
    deadline = time.monotonic() + wait_s
    status, details = "unknown", "the SuperLink did not report the run"
    while True:
        done = subprocess.run(
            cmd, env=dict(env), capture_output=True, text=True, timeout=60
        )
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            answer = {}
        runs = answer.get("runs", [])
        if answer.get("success") is False:  # e.g. the SuperLink is unreachable
            error = str(answer.get("error-message") or "").strip().splitlines()
            details = f"flwr ls failed: {error[-1] if error else 'no answer'}"
        if runs:
            status = str(runs[0].get("status", "unknown"))
            details = str(runs[0].get("status-details") or "")
        elif done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
            details = f"flwr ls failed: {tail[0]}"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(1.0)


class RunWatch:
    """Reads a ``flwr run --stream`` log line by line: the run's id and the
    error that ended it. Scripts that parse the log themselves feed it too."""

    def __init__(self) -> None:
        self.run_id: int | None = None
        self.ours = ""
        self.flowers = ""
        self.ended = False  # set by a reader whose stream closed by itself

    def feed(self, line: str) -> None:
        if self.run_id is None and (m := STARTED.search(ANSI.sub("", line))):
            self.run_id = int(m.group(1))
        if (found := error_of(line)) is not None:
            if found[0]:
                self.ours = self.ours or found[1]  # later ones are consequences
            else:
                self.flowers = found[1]

    def outcome(
        self,
        env: Mapping[str, str],
        *,
        connection: str | None = None,
        exit_code: int | None = None,
    ) -> RunOutcome:
        """How the run ended, asking the SuperLink (call after ``flwr run`` ends)."""
        last_error = self.ours or self.flowers
        if self.run_id is None:
            why = last_error or f"flwr exited {exit_code}"
            return RunOutcome(None, "not started", why)
        status, details = run_status(connection, self.run_id, env)
        if status == "finished:completed":
            return RunOutcome(self.run_id, status, "")
        reason = last_error or details or f"the SuperLink reports {status}"
        return RunOutcome(self.run_id, status, reason.splitlines()[0][:500])


def launch(
    flwr_args: Sequence[str],
    env: Mapping[str, str],
    *,
    connection: str | None = None,
    echo: TextIO | None = sys.stdout,
) -> RunOutcome:
    """Run ``flwr run <flwr_args> --stream``, echo its output, and say how the
    run ended (never another run's end: the id is the one Flower printed).

    ``flwr run`` starts a local SuperLink itself when none answers, in its own
    environment: that SuperLink too gets no per-run dependency installation
    (:func:`fedobj.superlink.no_runtime_install`).
    """
    env = no_runtime_install(env)
    cmd = ["flwr", "run", *flwr_args]
    if "--stream" not in cmd:
        cmd.append("--stream")
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    watch = RunWatch()
    assert proc.stdout is not None
    for line in proc.stdout:
        if echo is not None:
            echo.write(line)
            echo.flush()
        watch.feed(line)
    code = proc.wait()
    return watch.outcome(env, connection=connection, exit_code=code)
