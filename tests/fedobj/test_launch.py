"""Reading a `flwr run --stream` log: the run's id and the error that ended it."""

from __future__ import annotations

from fedobj.launch import RunOutcome, RunWatch, error_of

LOG = [
    "\x1b[92mINFO \x1b[0m:      Successfully started run 2593641028703847125\n",
    "INFO fedobj: catalog /x/catalog.db: applied migrations []\n",
    "ERROR fedobj: run config `model` must be one of ('cnn',), got 'nope'\n",
    "\x1b[91mERROR \x1b[0m:     Exit Code: 700\n",
    "\x1b[91mERROR \x1b[0m:     ServerApp thrown an exception\n",
    "ERROR fedobj: a consequence, not the cause\n",
]


def test_the_run_id_and_the_serverapps_first_error_are_kept() -> None:
    watch = RunWatch()
    for line in LOG:
        watch.feed(line)
    assert watch.run_id == 2593641028703847125
    assert watch.ours.startswith("run config `model` must be one of")
    assert watch.flowers == "ServerApp thrown an exception"


def test_error_lines_are_told_apart() -> None:
    assert error_of("INFO fedobj: round 1/5: ...") is None
    assert error_of("ERROR fedobj.serving: disk full") == (True, "disk full")
    assert error_of("\x1b[91mERROR \x1b[0m:     boom") == (False, "boom")


def test_a_run_that_never_started_is_not_completed() -> None:
    watch = RunWatch()
    watch.feed("❌ The provided run config is invalid\n")
    outcome = watch.outcome({}, exit_code=1)  # no id: the SuperLink is not asked
    assert outcome == RunOutcome(None, "not started", "flwr exited 1")
    assert not outcome.completed
    assert outcome.describe().startswith("flwr run did not start a run")
