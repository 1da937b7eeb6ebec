"""Prometheus metrics beyond Litestar's per-request ones.

Litestar's Prometheus middleware counts requests and times them per route; these
add what only the app knows: detections by outcome and the version being served.
Module-level, because prometheus_client registers each name once per process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DETECTIONS = Counter(
    "fedobj_detections_total",
    "Images classified by /detect and /detect/batch",
    ["detected"],
)
INFERENCE_SECONDS = Histogram(
    "fedobj_inference_seconds",
    "Model run time per image",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
CURRENT_VERSION = Gauge(
    "fedobj_current_version_info",
    "The model version /detect serves (value 1 on the served version)",
    ["version"],
)
_served: list[str] = []


def observe_detections(version: str, results: list[dict[str, object]]) -> None:
    """Count answered detections and mark ``version`` as the one served."""
    for r in results:
        DETECTIONS.labels(detected=str(bool(r.get("detected"))).lower()).inc()
        ms = r.get("inference_time_ms")
        if isinstance(ms, (int, float)):
            INFERENCE_SECONDS.observe(float(ms) / 1000.0)
    set_current_version(version)


def set_current_version(version: str | None) -> None:
    """Point ``fedobj_current_version_info`` at ``version``."""
    if _served and _served[0] == version:
        return
    for old in _served:
        CURRENT_VERSION.remove(old)
    _served.clear()
    if version is not None:
        CURRENT_VERSION.labels(version=version).set(1)
        _served.append(version)
