"""Request and response bodies: msgspec structs, so validation and OpenAPI agree.

Responses are built from the catalog's records by the ``*_out`` functions; no
route hands a record or a database row to the client directly, so storage
details (artifact URIs on the server's disk) never leak.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from fedobj.catalog import (
    AuditRecord,
    CategoryRecord,
    CategoryStats,
    DetectionRecord,
    NodeRecord,
    NodeRoundRecord,
    RoundRecord,
    RunSummary,
    VersionRecord,
)
from fedobj.catalog.tables import NAME_MAX

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX)]
Description = Annotated[str, msgspec.Meta(max_length=10_000)]


class CategoryCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A new category; its folder slug is derived from the name."""

    name: Name
    description: Description = ""


class CategoryUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Fields to change; the slug and class index never change."""

    name: Name | None = None
    description: Description | None = None
    is_active: bool | None = None


class CategoryOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    slug: str
    description: str
    class_index: int
    is_active: bool
    sample_count: int
    created_at: datetime
    updated_at: datetime


class CategoryStatsOut(msgspec.Struct):
    category: CategoryOut
    samples_reported: int
    current_version: str | None
    current_accuracy: float | None
    versions_including: int
    version_names: list[str]


class ClassEntryOut(msgspec.Struct):
    index: int
    slug: str
    name: str
    active: bool


class VersionOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    number: int
    parent_id: uuid.UUID | None
    run_id: str
    round: int
    num_classes: int
    class_map: list[ClassEntryOut]
    metrics: dict[str, Any]
    accuracy: float | None
    checkpoint_sha256: str
    size_bytes: int
    formats: dict[str, dict[str, Any]]
    is_current: bool
    pruned: bool
    notes: str
    created_at: datetime


class RunOut(msgspec.Struct):
    run_id: str
    rounds: int
    last_round: int
    last_status: str
    started_at: datetime | None
    completed_at: datetime | None


class RoundOut(msgspec.Struct):
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


class NodeResultOut(msgspec.Struct):
    node_id: str
    kind: str
    num_examples: int
    loss: float | None
    accuracy: float | None
    error: str | None


class RoundDetailOut(msgspec.Struct):
    round: RoundOut
    node_results: list[NodeResultOut]


class NodeOut(msgspec.Struct):
    node_id: str
    last_seen: datetime
    samples: int
    label_names: list[str]
    status: str
    dp_epsilon: float | None


class PredictionOut(msgspec.Struct):
    object_name: str
    confidence: float
    class_index: int


class DetectionOut(msgspec.Struct):
    predictions: list[PredictionOut]
    detected: bool
    inference_time_ms: float
    model_version: str | None


class BatchDetectionOut(msgspec.Struct):
    results: list[DetectionOut]
    model_version: str


class DetectionHistoryOut(msgspec.Struct):
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


class AuditOut(msgspec.Struct):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class Health(msgspec.Struct):
    status: str
    database: str
    current_version: str | None


def category_out(c: CategoryRecord) -> CategoryOut:
    return CategoryOut(
        id=c.id,
        name=c.name,
        slug=c.slug,
        description=c.description,
        class_index=c.class_index,
        is_active=c.is_active,
        sample_count=c.sample_count,
        created_at=c.created_at,
        updated_at=c.updated_at,
    )


def stats_out(s: CategoryStats) -> CategoryStatsOut:
    return CategoryStatsOut(
        category=category_out(s.category),
        samples_reported=s.samples_reported,
        current_version=s.current_version,
        current_accuracy=s.current_accuracy,
        versions_including=s.versions_including,
        version_names=list(s.version_names),
    )


def version_out(v: VersionRecord) -> VersionOut:
    formats: dict[str, dict[str, Any]] = {
        "checkpoint": {"sha256": v.checkpoint_sha256, "size": v.size_bytes}
    }
    for fmt, entry in v.artifacts.items():
        formats[fmt] = {k: val for k, val in entry.items() if k != "uri"}
    return VersionOut(
        id=v.id,
        name=v.name,
        number=v.number,
        parent_id=v.parent_id,
        run_id=v.run_id,
        round=v.round,
        num_classes=v.class_map.num_classes,
        class_map=[
            ClassEntryOut(e.index, e.slug, e.name, e.active)
            for e in v.class_map.entries
        ],
        metrics=dict(v.metrics),
        accuracy=v.accuracy,
        checkpoint_sha256=v.checkpoint_sha256,
        size_bytes=v.size_bytes,
        formats=formats,
        is_current=v.is_current,
        pruned=v.pruned,
        notes=v.notes,
        created_at=v.created_at,
    )


def run_out(r: RunSummary) -> RunOut:
    return RunOut(
        r.run_id, r.rounds, r.last_round, r.last_status, r.started_at, r.completed_at
    )


def round_out(r: RoundRecord) -> RoundOut:
    return RoundOut(
        run_id=r.run_id,
        round=r.round,
        status=r.status,
        nodes_sampled=r.nodes_sampled,
        nodes_replied=r.nodes_replied,
        nodes_rejected=r.nodes_rejected,
        started_at=r.started_at,
        completed_at=r.completed_at,
        central_accuracy=r.central_accuracy,
        central_loss=r.central_loss,
    )


def node_result_out(r: NodeRoundRecord) -> NodeResultOut:
    return NodeResultOut(r.node_id, r.kind, r.num_examples, r.loss, r.accuracy, r.error)


def node_out(n: NodeRecord) -> NodeOut:
    return NodeOut(
        n.node_id, n.last_seen, n.samples, list(n.label_names), n.status, n.dp_epsilon
    )


def detection_out(d: dict[str, Any]) -> DetectionOut:
    return DetectionOut(
        predictions=[
            PredictionOut(
                p["object_name"], float(p["confidence"]), int(p["class_index"])
            )
            for p in d["predictions"]
        ],
        detected=bool(d["detected"]),
        inference_time_ms=float(d["inference_time_ms"]),
        model_version=d.get("model_version"),
    )


def history_out(d: DetectionRecord) -> DetectionHistoryOut:
    return DetectionHistoryOut(
        id=d.id,
        at=d.at,
        actor=d.actor,
        image_sha256=d.image_sha256,
        model_version=d.model_version,
        detected=d.detected,
        top_class_index=d.top_class_index,
        top_confidence=d.top_confidence,
        predictions=list(d.predictions),
        inference_time_ms=d.inference_time_ms,
    )


def audit_out(a: AuditRecord) -> AuditOut:
    return AuditOut(a.id, a.at, a.actor, a.action, a.target, dict(a.detail))
