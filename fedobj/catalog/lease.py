"""The run lease: one live training run per catalog.

Two ServerApps writing versions and moving "current" in the same catalog would
interleave their rounds, so a run takes the lease before round 1 and renews it
as a heartbeat. A crashed run stops renewing; once its lease expires the next
run takes over. ``force=True`` is the operator's override for a lease they know
is stale. Acquiring is one conditional ``UPDATE`` on a single row, which both
databases execute atomically, so two runs racing for it cannot both win.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from piccolo.custom_types import Combinable

from fedobj.catalog._base import CatalogBase, guarded
from fedobj.catalog.errors import CatalogValueError, LeaseHeldError
from fedobj.catalog.records import LeaseRecord

LEASE_NAME = "training"


def _record(row: dict[str, Any] | None) -> LeaseRecord:
    if row is None:
        return LeaseRecord(holder=None, acquired_at=None, expires_at=None)
    return LeaseRecord(
        holder=row["holder"],
        acquired_at=row["acquired_at"],
        expires_at=row["expires_at"],
    )


LOST_LEASE = "run lost its lease"
"""The reason a run's row carries when another run took its lease over."""


class LeaseOps(CatalogBase):
    """Run-lease operations of :class:`fedobj.catalog.Catalog`."""

    @guarded
    async def acquire_lease(
        self, run_id: str, ttl_s: float, *, force: bool = False
    ) -> LeaseRecord:
        """Take the lease for ``run_id`` for ``ttl_s`` seconds.

        Succeeds when the lease is free, expired, already ``run_id``'s, or when
        ``force`` is true.

        Raises
        ------
        LeaseHeldError
            Another run holds an unexpired lease; the message names it.
        """
        if ttl_s <= 0:
            raise CatalogValueError(f"lease ttl must be positive, got {ttl_s}")
        t = self.tables.RunLease
        now = self.clock()
        values: dict[Any, Any] = {
            t.holder: str(run_id),
            t.acquired_at: now,
            t.expires_at: now + timedelta(seconds=ttl_s),
        }
        where: Combinable = t.name == LEASE_NAME
        if not force:
            where = where & (
                t.holder.is_null()
                | (t.holder == str(run_id))
                | t.expires_at.is_null()
                | (t.expires_at < now)
            )
        async with self._write():
            await t.insert(t(name=LEASE_NAME)).on_conflict(action="DO NOTHING")
            before = await t.select(t.holder).where(t.name == LEASE_NAME).first()
            rows = await t.update(values).where(where).returning(*t._meta.columns)
            if rows:
                previous = before["holder"] if before else None
                if previous is not None and previous != str(run_id):
                    await self._close_lost_run(previous, now)
                return _record(rows[0])
            held = await t.select().where(t.name == LEASE_NAME).first()
        holder = _record(held)
        until = "?"
        if holder.expires_at is not None:
            until = f"{holder.expires_at:%Y-%m-%d %H:%M:%S} UTC"
        raise LeaseHeldError(
            f"run {holder.holder!r} holds the catalog lease until {until}; wait for "
            "it to finish or for its lease to expire"
        )

    async def _close_lost_run(self, run_id: str, now: Any) -> None:
        """The run whose lease was taken over is dead (expired) or being
        overridden: its open round will never finish, so it is closed as
        failed, and its run row says why — not ``in_progress`` forever."""
        r = self.tables.TrainingRound
        await r.update({r.status: "failed", r.completed_at: now}).where(
            (r.run_id == run_id) & (r.status == "in_progress")
        )
        run = self.tables.Run
        await run.update(
            {run.status: "failed", run.error: LOST_LEASE, run.finished_at: now}
        ).where((run.run_id == run_id) & (run.status == "running"))

    @guarded
    async def renew_lease(self, run_id: str, ttl_s: float) -> LeaseRecord:
        """Extend ``run_id``'s lease to ``ttl_s`` seconds from now (heartbeat).

        Raises
        ------
        LeaseHeldError
            ``run_id`` no longer holds the lease (another run took it over).
        """
        if ttl_s <= 0:
            raise CatalogValueError(f"lease ttl must be positive, got {ttl_s}")
        t = self.tables.RunLease
        rows = (
            await t.update({t.expires_at: self.clock() + timedelta(seconds=ttl_s)})
            .where((t.name == LEASE_NAME) & (t.holder == str(run_id)))
            .returning(*t._meta.columns)
        )
        if rows:
            return _record(rows[0])
        now_held = await self.lease()
        raise LeaseHeldError(
            f"run {run_id!r} lost the catalog lease (now held by "
            f"{now_held.holder!r}); stop writing to this catalog"
        )

    @guarded
    async def release_lease(self, run_id: str) -> bool:
        """Give the lease up if ``run_id`` holds it; return whether it did."""
        t = self.tables.RunLease
        rows = (
            await t.update({t.holder: None, t.expires_at: None, t.acquired_at: None})
            .where((t.name == LEASE_NAME) & (t.holder == str(run_id)))
            .returning(t.name)
        )
        return bool(rows)

    @guarded
    async def lease(self) -> LeaseRecord:
        """Who holds the lease and until when (an expired holder is still shown)."""
        t = self.tables.RunLease
        return _record(await t.select().where(t.name == LEASE_NAME).first())
