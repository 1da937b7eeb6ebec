"""The catalog lease a ServerApp holds for its run, given back however the run ends.

A run that ends without giving the lease back blocks ``resume=true`` until the
lease expires (``lease-ttl``, 30 minutes by default). Three ways a run ends:

- it returns, or raises: the ``finally`` below gives the lease back;
- ``flwr stop``: Flower 1.41 revokes the ServerApp's token. Whichever notices
  first — a grid call that fails, or the heartbeat thread, which raises SIGINT —
  leads to ``flwr_exit``, which runs the exit handlers, starts a 5 s timer that
  ends the process with ``os._exit``, waits up to 4 s for telemetry (no network:
  the whole 4 s) and only then raises ``SystemExit`` in the main thread. Cleanup
  in a ``finally`` alone can be cut off by that timer (CI saw it), so the same
  cleanup is registered as an exit handler that runs *before* the timer starts;
- SIGKILL or a power cut: nothing runs; the lease expires after ``lease-ttl``.

The cleanup is idempotent (marking rounds failed and releasing a lease the run no
longer holds are no-ops), so running it from both places is safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.supercore.exit import add_exit_handler

from fedobj.catalog import LeaseHeldError, NotFoundError, SyncCatalog

log = logging.getLogger("fedobj.server")

# run id -> its cleanup, while the run is in progress in this process
_pending: dict[str, Callable[[], None]] = {}
_pending_lock = threading.Lock()
_hook_installed = False


def _on_flower_exit() -> None:
    """Flower's exit handler: give back every lease this process still holds."""
    global _hook_installed
    with _pending_lock:
        cleanups = list(_pending.values())
        _hook_installed = False  # Flower drops a handler once it has run it
    for cleanup in cleanups:
        cleanup()


def _install_exit_hook() -> None:
    global _hook_installed
    with _pending_lock:
        if _hook_installed:
            return
        _hook_installed = True
    add_exit_handler(_on_flower_exit, run_before_force_exit=True)


def close_interrupted_rounds(catalog: SyncCatalog, run_id: str) -> list[int]:
    """Mark the run's rounds still in progress as failed; return their numbers.

    The round in progress when a run is stopped left no version, so it stays in
    the catalog as ``failed`` (not forever ``in_progress``), and ``resume=true``
    runs that round number again under its own run id: one completed round and
    one version per round number.
    """
    try:
        cut = [r.round for r in catalog.rounds(run_id) if r.status == "in_progress"]
        for r in cut:
            catalog.finish_round(run_id, r, replied=0, rejected=0, status="failed")
        # `flwr stop` may end the process before the ServerApp's own handler runs
        with contextlib.suppress(NotFoundError):
            if catalog.get_run(run_id).status == "running":
                where = f" during round {cut[0]}" if cut else ""
                catalog.end_run(run_id, "failed", f"the run was stopped{where}")
    except Exception as exc:  # the lease must still be released, the cause raised
        log.error("run %s: could not mark interrupted rounds failed: %s", run_id, exc)
        return []
    if cut:
        log.warning(
            "run %s ended during round %s: marked failed (no version); "
            "`resume=true` continues from the current version",
            run_id,
            ", ".join(map(str, cut)),
        )
    return cut


@contextmanager
def held_lease(
    catalog: SyncCatalog, run_id: str, ttl_s: float, *, force: bool = False
) -> Iterator[None]:
    """Hold the catalog's run lease for the body; give it back however it ends.

    Raises ``LeaseHeldError`` (before the body) when another live run holds it.
    """
    try:
        catalog.acquire_lease(run_id, ttl_s, force=force)
    except LeaseHeldError as exc:  # name what the user can actually set
        raise LeaseHeldError(
            f"{exc}; if that run is dead, start this one with the run-config key "
            "allow-concurrent-runs=true (it takes the lease over and closes the "
            "dead run's open round)"
        ) from exc
    done = threading.Event()

    def give_back(interrupted: bool) -> None:
        if done.is_set():
            return
        if interrupted:
            close_interrupted_rounds(catalog, run_id)
        try:
            catalog.release_lease(run_id)
        except Exception as exc:  # logged; the lease then expires after its ttl
            log.error("run %s: could not release the catalog lease: %s", run_id, exc)
            return
        done.set()

    _install_exit_hook()
    with _pending_lock:
        _pending[run_id] = lambda: give_back(interrupted=True)
    try:
        yield
    except BaseException:  # `flwr stop` ends the ServerApp with an exception
        give_back(interrupted=True)
        raise
    finally:
        with _pending_lock:
            _pending.pop(run_id, None)
        give_back(interrupted=False)
