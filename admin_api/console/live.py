"""Live updates: one watcher per server process, server-sent events to browsers.

The round loop runs in another process (the ServerApp) and writes rounds, node
results and versions to the shared database. Rather than each open page polling
the database, one task per admin process reads a *fingerprint* of those tables
— a handful of ``MAX``/``COUNT`` values in one query — twice a second, and only
while at least one browser listens. When it changes, every listener gets one
event and refreshes its fragments; an idle page costs one parked coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fedobj.catalog import Catalog
from fedobj.errors import FedObjError

log = logging.getLogger("admin_api.console")

POLL_S = 0.5
"""How often the watcher reads the fingerprint: pages update within ~1 s of a
round's rows being written (the issue asks for 2 s)."""
KEEPALIVE_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""

FINGERPRINT_SQL = """
SELECT
  (SELECT COALESCE(MAX(id), 0) FROM training_round) AS rounds,
  (SELECT COUNT(*) FROM training_round WHERE status <> 'in_progress') AS ended,
  (SELECT COALESCE(MAX(id), 0) FROM node_round) AS node_results,
  (SELECT COALESCE(MAX(number), 0) FROM model_version) AS versions,
  (SELECT COALESCE(MAX(number), 0) FROM model_version WHERE is_current) AS current,
  (SELECT COUNT(*) FROM run) AS runs,
  (SELECT COUNT(*) FROM run WHERE status <> 'running') AS runs_ended
"""


class Broadcaster:
    """Watches the catalog for training progress and wakes every listener."""

    def __init__(self, catalog: Catalog, poll_s: float = POLL_S) -> None:
        self.catalog = catalog
        self.poll_s = poll_s
        self.fingerprint: dict[str, Any] = {}
        self.listeners = 0
        self.reads = 0  # fingerprint queries made (the benchmark reads it)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def read(self) -> dict[str, Any]:
        rows = await self.catalog.tables.Counter.raw(FINGERPRINT_SQL)
        self.reads += 1
        return {k: int(v or 0) for k, v in dict(rows[0]).items()}

    async def _watch(self) -> None:
        while self.listeners > 0:
            try:
                now = await self.read()
            except FedObjError as exc:  # a database blip: say so, keep watching
                log.warning("live updates: cannot read the catalog: %s", exc)
                now = self.fingerprint
            if now != self.fingerprint:
                self.fingerprint = now
                self._changed.set()
                self._changed = asyncio.Event()
            await asyncio.sleep(self.poll_s)
        self._task = None

    async def events(self) -> AsyncIterator[dict[str, str]]:
        """Server-sent events for one browser: the current state first, then
        one ``change`` event per change, with keep-alive comments between."""
        self.listeners += 1
        if self._task is None:
            self._task = asyncio.create_task(self._watch())
        try:
            if not self.fingerprint:
                self.fingerprint = await self.read()
            yield {"event": "change", "data": json.dumps(self.fingerprint)}
            while True:
                waiter = self._changed
                try:
                    await asyncio.wait_for(waiter.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield {"comment": "keep-alive"}
                    continue
                yield {"event": "change", "data": json.dumps(self.fingerprint)}
        finally:
            self.listeners -= 1

    async def close(self) -> None:
        self.listeners = 0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
