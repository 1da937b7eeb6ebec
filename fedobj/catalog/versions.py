"""Model versions: every round leaves one, exactly one is current (contract 6).

Moving "current" is always unset-old-then-set-new inside one transaction; the
partial unique index from the second migration makes a second current row an
integrity error whatever code (or SQL console) tries it. On PostgreSQL the
transactions that move it also lock ``model_version`` against each other, so two
concurrent registrations queue instead of one failing on the index.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

from piccolo.custom_types import Combinable

from fedobj.catalog._base import CatalogBase, finite_or_none, guarded, plain_json
from fedobj.catalog.cache import cached_read
from fedobj.catalog.db import is_unique_violation
from fedobj.catalog.errors import (
    CatalogValueError,
    ConflictError,
    DuplicateVersionError,
    NotFoundError,
    VersionPrunedError,
)
from fedobj.catalog.records import (
    VersionBrief,
    VersionRecord,
    json_value,
    version_from_row,
)
from fedobj.catalog.tables import NAME_MAX
from fedobj.classmap import ClassMap

VersionKey = uuid.UUID | str
"""A version's id or its name."""

_MOVE_LOCK = "SHARE ROW EXCLUSIVE"  # conflicts with itself, not with readers


def class_map_key(class_map: ClassMap) -> str:
    """Fingerprint of a class map: equal maps (indices, slugs, names, active
    flags) and only those share it, so "best" compares like with like."""
    return hashlib.sha256(class_map.to_json().encode()).hexdigest()


class VersionOps(CatalogBase):
    """Model-version operations of :class:`fedobj.catalog.Catalog`."""

    @guarded
    async def register_version(
        self,
        *,
        run_id: str,
        round: int,
        class_map: ClassMap,
        metrics: Mapping[str, Any],
        checkpoint_uri: str,
        checkpoint_sha256: str,
        size_bytes: int = 0,
        provenance: Mapping[str, Any] | None = None,
        parent: VersionKey | None = None,
        name: str | None = None,
        make_current: bool = True,
        onnx_uri: str | None = None,
        server_state_uri: str | None = None,
        notes: str = "",
    ) -> VersionRecord:
        """Record a trained model in one transaction, optionally making it current.

        Parameters
        ----------
        name
            Unique name; default ``v0001``, ``v0002``... from a counter that never
            goes back, so names stay unique even if versions are removed.
        metrics
            ``accuracy`` (used by :meth:`best_version`), ``loss``, per-class
            accuracy...; numpy scalars are unwrapped and NaN stored as null.
        make_current
            Move "current" here. The first version of a catalog becomes current
            even when ``False``, so that once versions exist, exactly one is.

        Raises
        ------
        DuplicateVersionError
            ``name`` is taken.
        NotFoundError
            ``parent`` does not exist.
        """
        t = self.tables.ModelVersion
        metrics_json = plain_json(dict(metrics), "metrics")
        provenance_json = plain_json(dict(provenance or {}), "provenance")
        async with self._write():
            await self._lock("model_version", _MOVE_LOCK)
            parent_id = None
            if parent is not None:
                parent_id = (await self._version_row(parent))["id"]
            number = await self._next_number("version") + 1
            name = name if name is not None else f"v{number:04d}"
            if not name.strip() or len(name) > NAME_MAX:
                raise CatalogValueError(f"invalid version name {name!r}")
            if await t.exists().where(t.name == name):
                raise DuplicateVersionError(f"version {name!r} already exists")
            has_current = await t.exists().where(t.is_current == True)  # noqa: E712
            current = make_current or not has_current
            if current and has_current:
                await t.update({t.is_current: False}).where(
                    t.is_current == True  # noqa: E712
                )
            row = t(
                id=uuid.uuid4(),
                number=number,
                name=name,
                parent=parent_id,
                run_id=str(run_id),
                round=int(round),
                class_map=class_map.to_dict(),
                class_map_key=class_map_key(class_map),
                num_classes=class_map.num_classes,
                metrics=metrics_json,
                accuracy=finite_or_none(metrics_json.get("accuracy")),
                checkpoint_uri=checkpoint_uri,
                checkpoint_sha256=checkpoint_sha256,
                onnx_uri=onnx_uri,
                size_bytes=int(size_bytes),
                provenance=provenance_json,
                server_state_uri=server_state_uri,
                is_current=current,
                pruned=False,
                notes=notes,
                created_at=self.clock(),
            )
            try:
                await t.insert(row)
            except Exception as exc:
                if is_unique_violation(exc):
                    raise DuplicateVersionError(
                        f"version {name!r} conflicts with an existing one: {exc}"
                    ) from exc
                raise
        return await self.get_version(row.id)

    async def _version_row(self, key: VersionKey) -> dict[str, Any]:
        t = self.tables.ModelVersion
        clause: Combinable
        if isinstance(key, uuid.UUID):
            clause = t.id == key
        else:
            try:
                clause = t.id == uuid.UUID(key)
            except ValueError:
                clause = t.name == key
        row = await t.select().where(clause).output(load_json=True).first()
        if row is None:
            raise NotFoundError(f"no model version {key!r}")
        return dict(row)

    @guarded
    async def get_version(self, key: VersionKey) -> VersionRecord:
        """One version by id or name. Raises :class:`NotFoundError`."""
        return version_from_row(await self._version_row(key))

    @guarded
    async def list_versions(
        self,
        *,
        run_id: str | None = None,
        include_pruned: bool = True,
        limit: int = 100,
        offset: int = 0,
    ) -> list[VersionRecord]:
        """Versions, newest first."""
        t = self.tables.ModelVersion
        query = t.select().order_by(t.number, ascending=False).limit(limit)
        query = query.offset(offset).output(load_json=True)
        if run_id is not None:
            query = query.where(t.run_id == run_id)
        if not include_pruned:
            query = query.where(t.pruned == False)  # noqa: E712
        return [version_from_row(r) for r in await query]

    @guarded
    async def list_version_briefs(
        self, *, run_id: str | None = None, limit: int = 100
    ) -> list[VersionBrief]:
        """Versions newest first, a few plain columns each (no JSON decoded)."""
        t = self.tables.ModelVersion
        query = (
            t.select(
                t.number,
                t.name,
                t.run_id,
                t.round,
                t.num_classes,
                t.accuracy,
                t.is_current,
            )
            .order_by(t.number, ascending=False)
            .limit(limit)
        )
        if run_id is not None:
            query = query.where(t.run_id == run_id)
        return [
            VersionBrief(
                number=int(r["number"]),
                name=r["name"],
                run_id=r["run_id"],
                round=int(r["round"]),
                num_classes=int(r["num_classes"]),
                accuracy=r["accuracy"],
                is_current=bool(r["is_current"]),
            )
            for r in await query
        ]

    @guarded
    @cached_read
    async def current_version(self) -> VersionRecord | None:
        """The version the next round and the next run start from, if any."""
        t = self.tables.ModelVersion
        row = (
            await t.select()
            .where(t.is_current == True)  # noqa: E712
            .output(load_json=True)
            .first()
        )
        return None if row is None else version_from_row(row)

    @guarded
    async def set_current(
        self, key: VersionKey, *, actor: str | None = None
    ) -> VersionRecord:
        """Make ``key`` the current version (a rollback when it is older).

        Raises
        ------
        NotFoundError
            No such version.
        VersionPrunedError
            Its checkpoint was pruned, so nothing could start from it.
        """
        t = self.tables.ModelVersion
        async with self._write():
            await self._lock("model_version", _MOVE_LOCK)
            row = await self._version_row(key)
            if row["pruned"]:
                raise VersionPrunedError(
                    f"version {row['name']!r} was pruned; it cannot become current"
                )
            if not row["is_current"]:
                await t.update({t.is_current: False}).where(
                    t.is_current == True  # noqa: E712
                )
                await t.update({t.is_current: True}).where(t.id == row["id"])
            await self._audit(
                actor, "version.set_current", str(row["id"]), {"name": row["name"]}
            )
        return await self.get_version(row["id"])

    @guarded
    async def best_version(
        self, class_map: ClassMap, *, include_pruned: bool = False
    ) -> VersionRecord | None:
        """Highest ``metrics['accuracy']`` among versions with this exact class map.

        Versions trained on another class map (more categories, or another set
        masked) solved a different problem, so their accuracy is not comparable.
        Ties go to the newest.
        """
        t = self.tables.ModelVersion
        query = (
            t.select()
            .where(t.class_map_key == class_map_key(class_map))
            .where(t.accuracy.is_not_null())
            .order_by(t.accuracy, t.number, ascending=False)
            .output(load_json=True)
        )
        if not include_pruned:
            query = query.where(t.pruned == False)  # noqa: E712
        row = await query.first()
        return None if row is None else version_from_row(row)

    @guarded
    async def mark_pruned(self, key: VersionKey) -> VersionRecord:
        """Record that a version's artifacts were deleted; the row stays.

        Raises
        ------
        ConflictError
            It is the current version: make another one current first.
        """
        t = self.tables.ModelVersion
        async with self._write():
            await self._lock("model_version", _MOVE_LOCK)
            row = await self._version_row(key)
            if row["is_current"]:
                raise ConflictError(
                    f"version {row['name']!r} is current; it cannot be pruned"
                )
            await t.update({t.pruned: True}).where(t.id == row["id"])
        return await self.get_version(row["id"])

    @guarded
    async def count_versions(
        self, *, run_id: str | None = None, include_pruned: bool = True
    ) -> int:
        """How many versions :meth:`list_versions` would page through."""
        t = self.tables.ModelVersion
        query = t.count()
        if run_id is not None:
            query = query.where(t.run_id == run_id)
        if not include_pruned:
            query = query.where(t.pruned == False)  # noqa: E712
        return int(await query)

    @guarded
    async def record_artifact(
        self,
        key: VersionKey,
        fmt: str,
        *,
        uri: str,
        sha256: str,
        size: int,
        extra: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Record an exported artifact of a version (``onnx``, ``onnx-int8``, ...).

        ``artifacts[fmt]`` holds its URI, hash, size and whatever the exporter
        measured (``extra``: parity, latency); ``onnx`` also fills ``onnx_uri``.
        Read-modify-write under the write lock, so two exports of different
        formats racing each other both land.
        """
        t = self.tables.ModelVersion
        async with self._write():
            await self._lock("model_version", _MOVE_LOCK)
            row = await self._version_row(key)
            artifacts = dict(json_value(row.get("artifacts")) or {})
            artifacts[fmt] = plain_json(
                {"uri": uri, "sha256": sha256, "size": int(size), **(extra or {})},
                f"artifact {fmt}",
            )
            values: dict[Any, Any] = {t.artifacts: artifacts}
            if fmt == "onnx":
                values[t.onnx_uri] = uri
            await t.update(values).where(t.id == row["id"])
        return await self.get_version(row["id"])

    @guarded
    async def update_version(
        self,
        key: VersionKey,
        *,
        onnx_uri: str | None = None,
        notes: str | None = None,
    ) -> VersionRecord:
        """Attach what is produced after registration (the ONNX export, notes)."""
        t = self.tables.ModelVersion
        values: dict[Any, Any] = {}
        if onnx_uri is not None:
            values[t.onnx_uri] = onnx_uri
        if notes is not None:
            values[t.notes] = notes
        async with self._write():
            row = await self._version_row(key)
            if values:
                await t.update(values).where(t.id == row["id"])
        return await self.get_version(row["id"])
