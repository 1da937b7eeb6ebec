"""Blocking twin of :class:`fedobj.catalog.Catalog` for synchronous callers.

Flower's strategy hooks, the CLI and tests are plain functions. Each method here
runs the matching coroutine with Piccolo's ``run_sync``: a fresh event loop per
call (or a worker thread when the caller is itself inside a running loop). That
is why the catalog keeps no connection pool: a pool made in one call's loop would
be dead in the next (DESIGN.md contract 7). A connection per call costs about a
millisecond on SQLite and a few on a local PostgreSQL, far below a round's cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from piccolo.utils.sync import run_sync

from fedobj.catalog._base import utcnow
from fedobj.catalog.admin import DetectionFilter
from fedobj.catalog.catalog import Catalog
from fedobj.catalog.categories import CategoryKey
from fedobj.catalog.migrate import migrate
from fedobj.catalog.records import (
    ApiKeyRecord,
    AuditRecord,
    CategoryRecord,
    CategoryStats,
    DetectionRecord,
    LeaseRecord,
    NodeRecord,
    NodeRoundRecord,
    RoundRecord,
    RunRecord,
    RunSummary,
    VersionRecord,
)
from fedobj.catalog.versions import VersionKey
from fedobj.classmap import ClassMap
from fedobj.data.categories import FASHION_MNIST_NAMES

R = TypeVar("R")


def _run(coro: Coroutine[Any, Any, R]) -> R:
    return run_sync(coro)


class SyncCatalog:
    """Synchronous access to one catalog database; same methods as ``Catalog``.

    Parameters are those of :class:`fedobj.catalog.Catalog`. The async catalog it
    drives is :attr:`aio` (never given a pool).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        default_path: str | os.PathLike[str] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.aio = Catalog(url, default_path=default_path, clock=clock)

    @property
    def url(self) -> str:
        """The database as logs may show it (password removed)."""
        return self.aio.url

    def __repr__(self) -> str:
        return f"SyncCatalog({self.aio.url!r})"

    # ------------------------------------------------------------ schema

    def migrate(self) -> list[str]:
        """Apply pending migrations; return their IDs."""
        return migrate(self.aio.spec.target)

    def ping(self) -> None:
        """Raise ``DatabaseUnavailableError`` unless reachable and migrated."""
        _run(self.aio.ping())

    # ------------------------------------------------------------ categories

    def add_category(
        self, name: str, description: str = "", *, actor: str | None = None
    ) -> CategoryRecord:
        """See :meth:`Catalog.add_category`."""
        return _run(self.aio.add_category(name, description, actor=actor))

    def list_categories(
        self,
        active: bool | None = None,
        search: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CategoryRecord]:
        """See :meth:`Catalog.list_categories`."""
        return _run(self.aio.list_categories(active, search, limit, offset))

    def count_categories(
        self, active: bool | None = None, search: str | None = None
    ) -> int:
        """See :meth:`Catalog.count_categories`."""
        return _run(self.aio.count_categories(active, search))

    def get_category(self, key: CategoryKey) -> CategoryRecord:
        """See :meth:`Catalog.get_category`."""
        return _run(self.aio.get_category(key))

    def update_category(
        self,
        key: CategoryKey,
        *,
        name: str | None = None,
        description: str | None = None,
        is_active: bool | None = None,
        actor: str | None = None,
    ) -> CategoryRecord:
        """See :meth:`Catalog.update_category`."""
        return _run(
            self.aio.update_category(
                key,
                name=name,
                description=description,
                is_active=is_active,
                actor=actor,
            )
        )

    def deactivate_category(
        self, key: CategoryKey, *, actor: str | None = None
    ) -> CategoryRecord:
        """See :meth:`Catalog.deactivate_category`."""
        return _run(self.aio.deactivate_category(key, actor=actor))

    def delete_category(self, key: CategoryKey, *, actor: str | None = None) -> None:
        """See :meth:`Catalog.delete_category`."""
        _run(self.aio.delete_category(key, actor=actor))

    def category_stats(self, key: CategoryKey) -> CategoryStats:
        """See :meth:`Catalog.category_stats`."""
        return _run(self.aio.category_stats(key))

    def snapshot(self) -> ClassMap:
        """See :meth:`Catalog.snapshot`."""
        return _run(self.aio.snapshot())

    def seed_categories(
        self, names: Iterable[str] = FASHION_MNIST_NAMES
    ) -> list[CategoryRecord]:
        """See :meth:`Catalog.seed_categories`."""
        return _run(self.aio.seed_categories(list(names)))

    def add_sample_counts(self, histogram: Mapping[str, int]) -> dict[str, int]:
        """See :meth:`Catalog.add_sample_counts`."""
        return _run(self.aio.add_sample_counts(histogram))

    # ------------------------------------------------------------ versions

    def register_version(
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
        """See :meth:`Catalog.register_version`."""
        return _run(
            self.aio.register_version(
                run_id=run_id,
                round=round,
                class_map=class_map,
                metrics=metrics,
                checkpoint_uri=checkpoint_uri,
                checkpoint_sha256=checkpoint_sha256,
                size_bytes=size_bytes,
                provenance=provenance,
                parent=parent,
                name=name,
                make_current=make_current,
                onnx_uri=onnx_uri,
                server_state_uri=server_state_uri,
                notes=notes,
            )
        )

    def get_version(self, key: VersionKey) -> VersionRecord:
        """See :meth:`Catalog.get_version`."""
        return _run(self.aio.get_version(key))

    def list_versions(
        self,
        *,
        run_id: str | None = None,
        include_pruned: bool = True,
        limit: int = 100,
        offset: int = 0,
    ) -> list[VersionRecord]:
        """See :meth:`Catalog.list_versions`."""
        return _run(
            self.aio.list_versions(
                run_id=run_id, include_pruned=include_pruned, limit=limit, offset=offset
            )
        )

    def current_version(self) -> VersionRecord | None:
        """See :meth:`Catalog.current_version`."""
        return _run(self.aio.current_version())

    def set_current(
        self, key: VersionKey, *, actor: str | None = None
    ) -> VersionRecord:
        """See :meth:`Catalog.set_current`."""
        return _run(self.aio.set_current(key, actor=actor))

    def record_artifact(
        self,
        key: VersionKey,
        fmt: str,
        *,
        uri: str,
        sha256: str,
        size: int,
        **extra: Any,
    ) -> VersionRecord:
        """See :meth:`Catalog.record_artifact`."""
        return _run(
            self.aio.record_artifact(
                key, fmt, uri=uri, sha256=sha256, size=size, extra=extra
            )
        )

    def best_version(
        self, class_map: ClassMap, *, include_pruned: bool = False
    ) -> VersionRecord | None:
        """See :meth:`Catalog.best_version`."""
        return _run(self.aio.best_version(class_map, include_pruned=include_pruned))

    def mark_pruned(self, key: VersionKey) -> VersionRecord:
        """See :meth:`Catalog.mark_pruned`."""
        return _run(self.aio.mark_pruned(key))

    def update_version(
        self, key: VersionKey, *, onnx_uri: str | None = None, notes: str | None = None
    ) -> VersionRecord:
        """See :meth:`Catalog.update_version`."""
        return _run(self.aio.update_version(key, onnx_uri=onnx_uri, notes=notes))

    # ------------------------------------------------------------ rounds

    def start_round(self, run_id: str, round: int, sampled: int) -> RoundRecord:
        """See :meth:`Catalog.start_round`."""
        return _run(self.aio.start_round(run_id, round, sampled))

    def finish_round(
        self,
        run_id: str,
        round: int,
        *,
        replied: int,
        rejected: int,
        accuracy: float | None = None,
        loss: float | None = None,
        status: str = "completed",
    ) -> RoundRecord:
        """See :meth:`Catalog.finish_round`."""
        return _run(
            self.aio.finish_round(
                run_id,
                round,
                replied=replied,
                rejected=rejected,
                accuracy=accuracy,
                loss=loss,
                status=status,
            )
        )

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """See :meth:`Catalog.rounds`."""
        return _run(self.aio.rounds(run_id))

    def list_runs(self) -> list[RunSummary]:
        """See :meth:`Catalog.list_runs`."""
        return _run(self.aio.list_runs())

    def begin_run(
        self,
        run_id: str,
        *,
        strategy: str,
        model: str,
        first_round: int,
        last_round: int,
        config: dict[str, Any] | None = None,
    ) -> RunRecord:
        """See :meth:`Catalog.begin_run`."""
        return _run(
            self.aio.begin_run(
                run_id,
                strategy=strategy,
                model=model,
                first_round=first_round,
                last_round=last_round,
                config=config,
            )
        )

    def end_run(self, run_id: str, status: str, error: str | None = None) -> RunRecord:
        """See :meth:`Catalog.end_run`."""
        return _run(self.aio.end_run(run_id, status, error))

    def list_run_records(self, limit: int = 100) -> list[RunRecord]:
        """See :meth:`Catalog.list_run_records`."""
        return _run(self.aio.list_run_records(limit))

    def get_run(self, run_id: str) -> RunRecord:
        """See :meth:`Catalog.get_run`."""
        return _run(self.aio.get_run(run_id))

    # ------------------------------------------------------------ nodes

    def upsert_node(
        self,
        node_id: str | int,
        *,
        samples: int,
        label_names: Iterable[str] | None = None,
        status: str = "active",
        dp_epsilon: float | None = None,
    ) -> NodeRecord:
        """See :meth:`Catalog.upsert_node`."""
        names = None if label_names is None else list(label_names)
        return _run(
            self.aio.upsert_node(
                node_id,
                samples=samples,
                label_names=names,
                status=status,
                dp_epsilon=dp_epsilon,
            )
        )

    def get_node(self, node_id: str | int) -> NodeRecord:
        """See :meth:`Catalog.get_node`."""
        return _run(self.aio.get_node(node_id))

    def list_nodes(self) -> list[NodeRecord]:
        """See :meth:`Catalog.list_nodes`."""
        return _run(self.aio.list_nodes())

    def record_node_round(
        self,
        run_id: str,
        round: int,
        node_id: str | int,
        kind: str,
        *,
        num_examples: int = 0,
        loss: float | None = None,
        accuracy: float | None = None,
        error: str | None = None,
        train_seconds: float | None = None,
        dp_epsilon: float | None = None,
    ) -> None:
        """See :meth:`Catalog.record_node_round`."""
        _run(
            self.aio.record_node_round(
                run_id,
                round,
                node_id,
                kind,
                num_examples=num_examples,
                loss=loss,
                accuracy=accuracy,
                error=error,
                train_seconds=train_seconds,
                dp_epsilon=dp_epsilon,
            )
        )

    def node_rounds(
        self, run_id: str, round: int | None = None, *, errors_only: bool = False
    ) -> list[NodeRoundRecord]:
        """See :meth:`Catalog.node_rounds`."""
        return _run(self.aio.node_rounds(run_id, round, errors_only=errors_only))

    def forget_node(self, node_id: str | int, *, actor: str | None = None) -> int:
        """See :meth:`Catalog.forget_node`."""
        return _run(self.aio.forget_node(node_id, actor=actor))

    # ------------------------------------------------------------ keys, audit

    def create_api_key(
        self,
        key_id: str,
        key_hash: str,
        role: str,
        name: str = "",
        *,
        actor: str | None = None,
    ) -> ApiKeyRecord:
        """See :meth:`Catalog.create_api_key`."""
        return _run(self.aio.create_api_key(key_id, key_hash, role, name, actor=actor))

    def list_api_keys(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        """See :meth:`Catalog.list_api_keys`."""
        return _run(self.aio.list_api_keys(include_revoked))

    def revoke_api_key(self, key_id: str, *, actor: str | None = None) -> ApiKeyRecord:
        """See :meth:`Catalog.revoke_api_key`."""
        return _run(self.aio.revoke_api_key(key_id, actor=actor))

    def list_audit(
        self, *, action: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[AuditRecord]:
        """See :meth:`Catalog.list_audit`."""
        return _run(self.aio.list_audit(action=action, limit=limit, offset=offset))

    def list_detections(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        where: DetectionFilter | None = None,
    ) -> list[DetectionRecord]:
        """See :meth:`Catalog.list_detections`."""
        return _run(self.aio.list_detections(limit=limit, offset=offset, where=where))

    def count_detections(self, where: DetectionFilter | None = None) -> int:
        """See :meth:`Catalog.count_detections`."""
        return _run(self.aio.count_detections(where))

    # ------------------------------------------------------------ lease

    def acquire_lease(
        self, run_id: str, ttl_s: float, *, force: bool = False
    ) -> LeaseRecord:
        """See :meth:`Catalog.acquire_lease`."""
        return _run(self.aio.acquire_lease(run_id, ttl_s, force=force))

    def renew_lease(self, run_id: str, ttl_s: float) -> LeaseRecord:
        """See :meth:`Catalog.renew_lease`."""
        return _run(self.aio.renew_lease(run_id, ttl_s))

    def release_lease(self, run_id: str) -> bool:
        """See :meth:`Catalog.release_lease`."""
        return _run(self.aio.release_lease(run_id))

    def lease(self) -> LeaseRecord:
        """See :meth:`Catalog.lease`."""
        return _run(self.aio.lease())
