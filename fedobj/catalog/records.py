"""Plain, immutable records the catalog returns.

Callers (the strategy, the admin API's DTOs, the CLI) get these dataclasses, never
Piccolo rows or dicts, so the table layout can change without touching them and a
record can be handed across threads or serialised as it is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fedobj.classmap import ClassMap

RoundStatus = Literal["pending", "in_progress", "completed", "failed"]
ROUND_STATUSES: tuple[str, ...] = ("pending", "in_progress", "completed", "failed")

NodeRoundKind = Literal["train", "evaluate"]
NODE_ROUND_KINDS: tuple[str, ...] = ("train", "evaluate")


@dataclass(frozen=True)
class CategoryRecord:
    """A category; ``class_index`` is its head row forever (contract 1)."""

    id: uuid.UUID
    name: str
    slug: str
    description: str
    class_index: int
    is_active: bool
    sample_count: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    """A registered model version (contract 6)."""

    id: uuid.UUID
    number: int
    name: str
    parent_id: uuid.UUID | None
    run_id: str
    round: int
    class_map: ClassMap
    metrics: dict[str, Any]
    accuracy: float | None
    checkpoint_uri: str
    checkpoint_sha256: str
    onnx_uri: str | None
    size_bytes: int
    provenance: dict[str, Any]
    server_state_uri: str | None
    artifacts: dict[str, dict[str, Any]]
    is_current: bool
    pruned: bool
    notes: str
    created_at: datetime


@dataclass(frozen=True)
class VersionBrief:
    """A version without its JSON (metrics, class map, provenance): for lists
    that show many versions, where decoding those dominates the page's time."""

    number: int
    name: str
    run_id: str
    round: int
    num_classes: int
    accuracy: float | None
    is_current: bool


@dataclass(frozen=True)
class RoundRecord:
    """One server round of one run."""

    run_id: str
    round: int
    status: str
    nodes_sampled: int
    nodes_replied: int
    nodes_rejected: int
    started_at: datetime | None
    completed_at: datetime | None
    central_accuracy: float | None
    central_loss: float | None


@dataclass(frozen=True)
class RunSummary:
    """A run at a glance: how far it got and when."""

    run_id: str
    rounds: int
    last_round: int
    last_status: str
    started_at: datetime | None
    completed_at: datetime | None


@dataclass(frozen=True)
class NodeRecord:
    """A device as it last reported itself."""

    node_id: str
    last_seen: datetime
    samples: int
    label_names: list[str] = field(default_factory=list)
    status: str = "active"
    dp_epsilon: float | None = None


@dataclass(frozen=True)
class NodeRoundRecord:
    """What one node reported for one train or evaluate message."""

    run_id: str
    round: int
    node_id: str
    kind: str
    num_examples: int
    loss: float | None
    accuracy: float | None
    error: str | None
    created_at: datetime
    train_seconds: float | None = None
    dp_epsilon: float | None = None


@dataclass(frozen=True)
class RunRecord:
    """A run as its ServerApp began it (rounds ``first_round..last_round``)."""

    run_id: str
    status: str  # running | completed | failed
    strategy: str
    model: str
    first_round: int
    last_round: int
    config: dict[str, Any]
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class CategoryStats:
    """What the federation knows about one category (admin API ``/stats``)."""

    category: CategoryRecord
    samples_reported: int
    current_version: str | None
    current_accuracy: float | None
    versions_including: int
    version_names: list[str]


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key without its secret: the keyed hash is all that is stored."""

    id: uuid.UUID
    key_id: str
    key_hash: str
    role: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class AuditRecord:
    """One admin write."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class DetectionRecord:
    """One answered detection (the image's hash, never the image)."""

    id: int
    at: datetime
    actor: str
    image_sha256: str
    model_version: str
    detected: bool
    top_class_index: int | None
    top_confidence: float | None
    predictions: list[dict[str, Any]]
    inference_time_ms: float


@dataclass(frozen=True)
class LeaseRecord:
    """The run lease: who holds it and until when (``holder`` None: free)."""

    holder: str | None
    acquired_at: datetime | None
    expires_at: datetime | None


def json_value(value: Any) -> Any:
    """A JSON column's value as Python data, whichever driver returned it.

    ``.output(load_json=True)`` decodes on PostgreSQL; SQLite may still hand back
    text, and raw queries always do.
    """
    if isinstance(value, (str, bytes)):
        return json.loads(value)
    return value


def category_from_row(row: Mapping[str, Any]) -> CategoryRecord:
    """A selected ``category`` row as a record."""
    return CategoryRecord(
        id=row["id"],
        name=row["name"],
        slug=row["slug"],
        description=row["description"] or "",
        class_index=int(row["class_index"]),
        is_active=bool(row["is_active"]),
        sample_count=int(row["sample_count"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def version_from_row(row: Mapping[str, Any]) -> VersionRecord:
    """A selected ``model_version`` row as a record (class map rebuilt)."""
    return VersionRecord(
        id=row["id"],
        number=int(row["number"]),
        name=row["name"],
        parent_id=row["parent"],
        run_id=row["run_id"],
        round=int(row["round"]),
        class_map=ClassMap.from_dict(json_value(row["class_map"])),
        metrics=dict(json_value(row["metrics"]) or {}),
        accuracy=row["accuracy"],
        checkpoint_uri=row["checkpoint_uri"],
        checkpoint_sha256=row["checkpoint_sha256"],
        onnx_uri=row["onnx_uri"],
        size_bytes=int(row["size_bytes"]),
        provenance=dict(json_value(row["provenance"]) or {}),
        server_state_uri=row["server_state_uri"],
        artifacts=dict(json_value(row.get("artifacts")) or {}),
        is_current=bool(row["is_current"]),
        pruned=bool(row["pruned"]),
        notes=row["notes"] or "",
        created_at=row["created_at"],
    )


def round_from_row(row: Mapping[str, Any]) -> RoundRecord:
    """A selected ``training_round`` row as a record."""
    return RoundRecord(
        run_id=row["run_id"],
        round=int(row["round"]),
        status=row["status"],
        nodes_sampled=int(row["nodes_sampled"]),
        nodes_replied=int(row["nodes_replied"]),
        nodes_rejected=int(row["nodes_rejected"]),
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        central_accuracy=row["central_accuracy"],
        central_loss=row["central_loss"],
    )


def node_from_row(row: Mapping[str, Any]) -> NodeRecord:
    """A selected ``node`` row as a record."""
    return NodeRecord(
        node_id=row["node_id"],
        last_seen=row["last_seen"],
        samples=int(row["samples"]),
        label_names=[str(n) for n in json_value(row["label_names"]) or []],
        status=row["status"],
        dp_epsilon=row.get("dp_epsilon"),
    )


def node_round_from_row(row: Mapping[str, Any]) -> NodeRoundRecord:
    """A selected ``node_round`` row as a record."""
    return NodeRoundRecord(
        run_id=row["run_id"],
        round=int(row["round"]),
        node_id=row["node_id"],
        kind=row["kind"],
        num_examples=int(row["num_examples"]),
        loss=row["loss"],
        accuracy=row["accuracy"],
        error=row["error"],
        created_at=row["created_at"],
        train_seconds=row.get("train_seconds"),
        dp_epsilon=row.get("dp_epsilon"),
    )


def run_from_row(row: Mapping[str, Any]) -> RunRecord:
    """A selected ``run`` row as a record."""
    return RunRecord(
        run_id=row["run_id"],
        status=row["status"],
        strategy=row["strategy"] or "",
        model=row["model"] or "",
        first_round=int(row["first_round"]),
        last_round=int(row["last_round"]),
        config=dict(json_value(row["config"]) or {}),
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def api_key_from_row(row: Mapping[str, Any]) -> ApiKeyRecord:
    """A selected ``api_key`` row as a record."""
    return ApiKeyRecord(
        id=row["id"],
        key_id=row["key_id"],
        key_hash=row["key_hash"],
        role=row["role"],
        name=row["name"] or "",
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )


def audit_from_row(row: Mapping[str, Any]) -> AuditRecord:
    """A selected ``audit_entry`` row as a record."""
    return AuditRecord(
        id=int(row["id"]),
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        target=row["target"] or "",
        detail=dict(json_value(row["detail"]) or {}),
    )


def detection_from_row(row: Mapping[str, Any]) -> DetectionRecord:
    """A selected ``detection`` row as a record."""
    return DetectionRecord(
        id=int(row["id"]),
        at=row["at"],
        actor=row["actor"],
        image_sha256=row["image_sha256"],
        model_version=row["model_version"],
        detected=bool(row["detected"]),
        top_class_index=row["top_class_index"],
        top_confidence=row["top_confidence"],
        predictions=list(json_value(row["predictions"]) or []),
        inference_time_ms=float(row["inference_time_ms"]),
    )
