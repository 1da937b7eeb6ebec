"""What the console's pages show, read from the catalog in one place.

Each function turns catalog records into the plain values a template renders
(no Litestar, no HTML here), so the overview's arithmetic — round k of N, ETA,
federated accuracy, where the head grew, the round feed — is tested without a
browser, and the pages and the live fragments cannot disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedobj.catalog import (
    Catalog,
    NodeRoundRecord,
    RoundRecord,
    RunRecord,
    VersionBrief,
    VersionRecord,
)
from fedobj.confusion import confusion_from_metrics

RUN_VERSIONS = 1000
"""Most versions of one run the overview reads (a round each)."""


@dataclass(frozen=True)
class FeedLine:
    """One finished (or running) round, as the overview's feed says it."""

    round: int
    status: str
    sampled: int
    replied: int
    rejected: int
    reasons: dict[str, int]
    version: str | None
    classes: int | None
    seconds: float | None
    grew: bool

    @property
    def text(self) -> str:
        """E.g. ``round 7: 9/10 nodes, 1 rejected (shape), v0007, 12.3 s``."""
        parts = [f"round {self.round}: {self.replied}/{self.sampled} nodes"]
        if self.rejected:
            why = ", ".join(f"{k}" for k in self.reasons) or "invalid"
            parts.append(f"{self.rejected} rejected ({why})")
        if self.status == "in_progress":
            parts.append("training…")
        elif self.status == "failed":
            parts.append("failed")
        if self.version:
            parts.append(self.version)
        if self.grew and self.classes is not None:
            parts.append(f"head grew to {self.classes} classes")
        if self.seconds is not None:
            parts.append(f"{self.seconds:.1f} s")
        return ", ".join(parts)


@dataclass(frozen=True)
class Overview:
    """The current run at a glance, plus its per-round series."""

    run: RunRecord | None
    rounds: list[RoundRecord]
    feed: list[FeedLine]
    current: VersionRecord | None
    round_now: int | None
    round_total: int | None
    elapsed_s: float | None
    eta_s: float | None
    latest: RoundRecord | None
    series: dict[str, list[Any]] = field(default_factory=dict)


def short_reason(error: str) -> str:
    """A rejection's kind, for the feed: the words before the first colon."""
    head = error.split(":", 1)[0].strip().lower()
    return head[:40] or "invalid"


def federated(results: list[NodeRoundRecord]) -> tuple[float | None, float | None]:
    """Example-weighted accuracy and loss of the nodes' own evaluations."""
    ok = [r for r in results if r.kind == "evaluate" and r.error is None]
    total = sum(r.num_examples for r in ok)
    if not total:
        return None, None
    acc = [(r.accuracy, r.num_examples) for r in ok if r.accuracy is not None]
    loss = [(r.loss, r.num_examples) for r in ok if r.loss is not None]
    return (
        sum(a * n for a, n in acc) / total if acc else None,
        sum(v * n for v, n in loss) / total if loss else None,
    )


def _seconds(r: RoundRecord) -> float | None:
    if r.started_at is None or r.completed_at is None:
        return None
    return max((r.completed_at - r.started_at).total_seconds(), 0.0)


def build_feed(
    rounds: list[RoundRecord],
    node_rounds: list[NodeRoundRecord],
    versions: Sequence[VersionBrief | VersionRecord],
) -> list[FeedLine]:
    """One line per round, newest first."""
    by_round = {v.round: v for v in sorted(versions, key=lambda v: v.number)}
    reasons: dict[int, Counter[str]] = {}
    for n in node_rounds:
        if n.kind == "train" and n.error:
            reasons.setdefault(n.round, Counter())[short_reason(n.error)] += 1
    lines, previous = [], None
    for r in rounds:
        v = by_round.get(r.round)
        classes = _num_classes(v) if v is not None else None
        grew = previous is not None and classes is not None and classes > previous
        if classes is not None:
            previous = classes
        lines.append(
            FeedLine(
                round=r.round,
                status=r.status,
                sampled=r.nodes_sampled,
                replied=r.nodes_replied,
                rejected=r.nodes_rejected,
                reasons=dict(reasons.get(r.round, {})),
                version=v.name if v is not None else None,
                classes=classes,
                seconds=_seconds(r),
                grew=grew,
            )
        )
    return lines[::-1]


def _num_classes(v: VersionBrief | VersionRecord) -> int:
    if isinstance(v, VersionBrief):
        return v.num_classes
    return v.class_map.num_classes


def federated_by_round(
    results: list[NodeRoundRecord],
) -> dict[int, tuple[float | None, float | None]]:
    """:func:`federated` per round (the catalog's ``federated_by_round`` sums
    the same in SQL)."""
    per_round: dict[int, list[NodeRoundRecord]] = {}
    for n in results:
        per_round.setdefault(n.round, []).append(n)
    return {r: federated(ns) for r, ns in per_round.items()}


def build_series(
    rounds: list[RoundRecord],
    fed: Mapping[int, tuple[float | None, float | None]],
    feed: list[FeedLine],
) -> dict[str, list[Any]]:
    """Per-round columns for the chart (uPlot's column layout), ``None`` gaps."""
    done = [r for r in rounds if r.status == "completed"]
    pairs = [fed.get(r.round, (None, None)) for r in done]
    return {
        "round": [r.round for r in done],
        "central_accuracy": [r.central_accuracy for r in done],
        "central_loss": [r.central_loss for r in done],
        "federated_accuracy": [p[0] for p in pairs],
        "federated_loss": [p[1] for p in pairs],
        "grew_at": sorted(line.round for line in feed if line.grew),
    }


async def current_run(catalog: Catalog) -> RunRecord | None:
    """The latest run; a run recorded before runs had rows of their own is
    described from its rounds (its plan unknown: N is the rounds it ran)."""
    runs = await catalog.list_run_records(limit=1)
    if runs:
        return runs[0]
    summaries = await catalog.list_runs()
    if not summaries or summaries[0].started_at is None:
        return None
    s = summaries[0]
    assert s.started_at is not None  # checked above
    return RunRecord(
        run_id=s.run_id,
        status="running" if s.last_status == "in_progress" else "completed",
        strategy="",
        model="",
        first_round=1,
        last_round=s.last_round,
        config={},
        error=None,
        started_at=s.started_at,
        finished_at=s.completed_at,
    )


async def overview(catalog: Catalog, now: datetime | None = None) -> Overview:
    """Everything the overview page and its live fragments show."""
    now = now or datetime.now(UTC)
    run = await current_run(catalog)
    current = await catalog.current_version()
    if run is None:
        return Overview(None, [], [], current, None, None, None, None, None)
    rounds = await catalog.rounds(run.run_id)
    rejected = await catalog.node_rounds(run.run_id, errors_only=True)
    versions = await catalog.list_version_briefs(run_id=run.run_id, limit=RUN_VERSIONS)
    feed = build_feed(rounds, rejected, versions)
    latest = rounds[-1] if rounds else None
    end = run.finished_at or now
    elapsed = max((end - run.started_at).total_seconds(), 0.0)
    durations = [s for r in rounds if (s := _seconds(r)) is not None]
    finished = sum(1 for r in rounds if r.status == "completed")
    remaining = max(run.last_round - run.first_round + 1 - finished, 0)
    eta = (
        sum(durations) / len(durations) * remaining
        if durations and run.status == "running"
        else None
    )
    return Overview(
        run=run,
        rounds=rounds,
        feed=feed,
        current=current,
        round_now=latest.round if latest else None,
        round_total=run.last_round,
        elapsed_s=elapsed,
        eta_s=eta,
        latest=latest,
        series=build_series(rounds, await catalog.federated_by_round(run.run_id), feed),
    )


@dataclass(frozen=True)
class ClassRow:
    """One row of a version's per-class table."""

    index: int
    name: str
    slug: str
    active: bool
    accuracy: float | None


def class_rows(version: VersionRecord) -> list[ClassRow]:
    """The version's classes with their centralised accuracy (if measured)."""
    return [
        ClassRow(
            e.index,
            e.name,
            e.slug,
            e.active,
            _float(version.metrics.get(f"class-{e.index}-accuracy")),
        )
        for e in version.class_map.entries
    ]


def confusion(version: VersionRecord) -> tuple[list[str], list[list[int]]]:
    """Row/column labels and the confusion matrix, if the version has one."""
    classes, matrix = confusion_from_metrics(version.metrics)
    names = {e.index: e.name for e in version.class_map.entries}
    return [names.get(c, f"#{c}") for c in classes], matrix


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def duration(seconds: float | None) -> str:
    """``1 h 02 min``, ``3 min 05 s``, ``12.3 s`` or ``–``."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
