"""API keys, the audit trail and the detection history of the admin plane.

Keys are stored as keyed hashes only (``fedobj.apikeys`` makes and checks them);
creating or revoking one leaves an audit row in the same transaction, like every
other admin write. Detections keep the image's SHA-256, never the image.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fedobj.catalog._base import CatalogBase, finite_or_none, guarded, plain_json
from fedobj.catalog.db import is_unique_violation
from fedobj.catalog.errors import CatalogValueError, ConflictError, NotFoundError
from fedobj.catalog.records import (
    ApiKeyRecord,
    AuditRecord,
    DetectionRecord,
    api_key_from_row,
    audit_from_row,
    detection_from_row,
)

ROLES: tuple[str, ...] = ("admin", "viewer", "device")
"""Admin: everything; viewer: reads; device: detection, and the category list."""


@dataclass(frozen=True)
class DetectionFilter:
    """Which detections a history page shows: top category, version, time span."""

    class_index: int | None = None
    model_version: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class AdminOps(CatalogBase):
    """Key, audit and detection operations of :class:`fedobj.catalog.Catalog`."""

    # ------------------------------------------------------------ API keys

    @guarded
    async def create_api_key(
        self,
        key_id: str,
        key_hash: str,
        role: str,
        name: str = "",
        *,
        actor: str | None = None,
    ) -> ApiKeyRecord:
        """Store a new key's id and keyed hash (never the token itself).

        Raises
        ------
        CatalogValueError
            Unknown role.
        ConflictError
            ``key_id`` exists (astronomically unlikely for a random id).
        """
        if role not in ROLES:
            raise CatalogValueError(f"role must be one of {ROLES}, got {role!r}")
        t = self.tables.ApiKey
        row = t(
            id=uuid.uuid4(),
            key_id=key_id,
            key_hash=key_hash,
            role=role,
            name=name[:255],
            created_at=self.clock(),
        )
        async with self._write():
            try:
                await t.insert(row)
            except Exception as exc:
                if is_unique_violation(exc):
                    raise ConflictError(f"API key id {key_id!r} exists") from exc
                raise
            await self._audit(
                actor or "cli",
                "key.create",
                key_id,
                {"role": role, "name": name},
            )
        return await self.get_api_key(key_id)

    @guarded
    async def get_api_key(self, key_id: str) -> ApiKeyRecord:
        """One key by its public id (revoked ones too). Raises NotFoundError."""
        t = self.tables.ApiKey
        row = await t.select().where(t.key_id == key_id).first()
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}")
        return api_key_from_row(row)

    @guarded
    async def list_api_keys(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        """Keys, oldest first."""
        t = self.tables.ApiKey
        query = t.select().order_by(t.created_at)
        if not include_revoked:
            query = query.where(t.revoked_at.is_null())
        return [api_key_from_row(r) for r in await query]

    @guarded
    async def revoke_api_key(
        self, key_id: str, *, actor: str | None = None
    ) -> ApiKeyRecord:
        """Revoke a key from now on; revoking twice changes nothing.

        Raises NotFoundError for an unknown key id.
        """
        t = self.tables.ApiKey
        async with self._write():
            row = await t.select().where(t.key_id == key_id).first()
            if row is None:
                raise NotFoundError(f"no API key {key_id!r}")
            if row["revoked_at"] is None:
                await t.update({t.revoked_at: self.clock()}).where(t.key_id == key_id)
                await self._audit(
                    actor or "cli", "key.revoke", key_id, {"role": row["role"]}
                )
        return await self.get_api_key(key_id)

    @guarded
    async def touch_api_key(self, key_id: str, when: datetime | None = None) -> None:
        """Record that a key was used (callers throttle this: it is a write)."""
        t = self.tables.ApiKey
        await t.update({t.last_used_at: when or self.clock()}).where(t.key_id == key_id)

    # ------------------------------------------------------------ audit

    @guarded
    async def audit(
        self,
        actor: str,
        action: str,
        target: str = "",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Leave an audit row for a write that is not a catalog method of its own."""
        async with self._write():
            await self._audit(actor, action, target, detail)

    @guarded
    async def list_audit(
        self,
        *,
        action: str | None = None,
        actor: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[AuditRecord]:
        """Audit rows, newest first."""
        t = self.tables.AuditEntry
        query = (
            t.select()
            .order_by(t._meta.primary_key, ascending=False)
            .limit(limit)
            .offset(offset)
        )
        if action is not None:
            query = query.where(t.action == action)
        if actor is not None:
            query = query.where(t.actor == actor)
        return [audit_from_row(r) for r in await query.output(load_json=True)]

    @guarded
    async def count_audit(
        self, *, action: str | None = None, actor: str | None = None
    ) -> int:
        """How many rows :meth:`list_audit` would page through."""
        t = self.tables.AuditEntry
        query = t.count()
        if action is not None:
            query = query.where(t.action == action)
        if actor is not None:
            query = query.where(t.actor == actor)
        return int(await query)

    # ------------------------------------------------------------ detections

    @guarded
    async def record_detections(
        self,
        actor: str,
        model_version: str,
        results: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> None:
        """Store answered detections: ``(image_sha256, detection dict)`` each.

        The detection dict is the API's response shape (``predictions``,
        ``detected``, ``inference_time_ms``). One transaction for a batch.
        """
        await self.insert_detection_rows(
            self.detection_rows(actor, model_version, results)
        )

    def detection_rows(
        self,
        actor: str,
        model_version: str,
        results: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> list[Any]:
        """Detection rows ready to insert, checked now (no database needed).

        Split from the insert so a caller that stores many requests' rows in one
        transaction (the admin API's group commit) finds a bad value while it
        still belongs to one request.
        """
        t = self.tables.Detection
        now = self.clock()
        rows = []
        for sha, det in results:
            preds = list(det.get("predictions") or [])
            top = preds[0] if preds else {}
            rows.append(
                t(
                    at=now,
                    actor=actor[:64],
                    image_sha256=sha,
                    model_version=model_version,
                    detected=bool(det.get("detected", False)),
                    top_class_index=top.get("class_index"),
                    top_confidence=finite_or_none(top.get("confidence")),
                    predictions=plain_json(preds, "detection predictions"),
                    inference_time_ms=finite_or_none(det.get("inference_time_ms"))
                    or 0.0,
                )
            )
        return rows

    @guarded
    async def insert_detection_rows(self, rows: Sequence[Any]) -> None:
        """Insert rows from :meth:`detection_rows` in one transaction."""
        if not rows:
            return
        async with self._write():
            await self.tables.Detection.insert(*rows)

    def _detections_where(self, query: Any, f: DetectionFilter | None) -> Any:
        t = self.tables.Detection
        if f is None:
            return query
        if f.class_index is not None:
            query = query.where(t.top_class_index == int(f.class_index))
        if f.model_version:
            query = query.where(t.model_version == f.model_version)
        if f.since is not None:
            query = query.where(t.at >= f.since)
        if f.until is not None:
            query = query.where(t.at < f.until)
        return query

    @guarded
    async def list_detections(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        where: DetectionFilter | None = None,
    ) -> list[DetectionRecord]:
        """Detections, newest first, optionally filtered (``where``)."""
        t = self.tables.Detection
        query = (
            t.select()
            .order_by(t._meta.primary_key, ascending=False)
            .limit(limit)
            .offset(offset)
        )
        query = self._detections_where(query, where)
        return [detection_from_row(r) for r in await query.output(load_json=True)]

    @guarded
    async def count_detections(self, where: DetectionFilter | None = None) -> int:
        """How many rows :meth:`list_detections` would page through."""
        return int(await self._detections_where(self.tables.Detection.count(), where))
