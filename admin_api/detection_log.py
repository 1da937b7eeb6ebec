"""Detection history written in group commits.

Every ``/detect`` answer is stored before it is returned (the history page and
its CSV must not miss one). A transaction per request capped the route at a
few hundred requests per second on SQLite, whose writers take turns, and each
one paid a connection set-up. Here requests hand their rows to one writer task
and wait; the writer stores whatever has queued up in one transaction and wakes
each waiter with the outcome. Under light load a batch is one request and
nothing waits longer than its own commit; under heavy load the batch grows and
the cost per request falls. No timer: a batch closes when the previous commit
ends.

A failed commit (a full disk: :class:`fedobj.catalog.DatabaseWriteError`)
fails every request of its batch, as it would have failed each alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fedobj.catalog import Catalog

log = logging.getLogger("admin_api")

MAX_BATCH_ROWS = 512
"""Rows per transaction at most; a longer queue is written in several."""

_Item = tuple[list[Any], "asyncio.Future[None]"]


class DetectionLog:
    """Stores detections for many concurrent requests, one commit per batch."""

    def __init__(self, catalog: Catalog, max_batch_rows: int = MAX_BATCH_ROWS) -> None:
        self.catalog = catalog
        self.max_batch_rows = max_batch_rows
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0

    def start(self) -> None:
        """Start the writer task in the running loop (the app's start-up)."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_forever())

    async def record(
        self,
        actor: str,
        model_version: str,
        results: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> None:
        """Store ``results`` (``(image_sha256, detection dict)`` each); returns
        once they are committed, raises what the commit raised."""
        rows = self.catalog.detection_rows(actor, model_version, results)
        if not rows:
            return
        if self._writer is None or self._writer.done():
            await self.catalog.insert_detection_rows(rows)  # not serving: direct
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((rows, done))
        await done

    async def _write_forever(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            batch, size = [first], len(first[0])
            while not self._queue.empty() and size < self.max_batch_rows:
                item = self._queue.get_nowait()
                if item is None:  # write what came before, then stop
                    stopping = True
                    break
                batch.append(item)
                size += len(item[0])
            await self._commit(batch)

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            await self.catalog.insert_detection_rows(
                [row for rows, _ in batch for row in rows]
            )
        except Exception as exc:
            log.warning("storing %d detections failed: %s", len(batch), exc)
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
        else:
            self.commits += 1
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def close(self) -> None:
        """Write what is queued, then stop the writer (the app's shutdown)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await writer
