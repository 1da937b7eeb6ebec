"""Detection from uploads or the camera, its history (filter, page, CSV), and
the audit log."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Template

from admin_api.auth import DETECT, READ, WRITE
from admin_api.console.auth import require
from admin_api.console.render import page
from admin_api.metrics import observe_detections
from admin_api.routes.common import (
    CatalogDep,
    ServerDep,
    actor_of,
    detection_log_of,
)
from admin_api.settings import ApiSettings
from fedobj.catalog import DetectionFilter
from fedobj.inference import ImageInputError
from fedobj.serving import detect, image_digest

HISTORY_PAGE = 25
CSV_MAX = 100_000
"""Most rows one CSV export holds (the newest ones matching the filter)."""


@dataclass
class DetectForm:
    """``images``: one or more files (an upload, or a camera frame as a PNG)."""

    images: list[UploadFile]
    top_k: int = 3
    threshold: float = 0.7


@dataclass(frozen=True)
class Outcome:
    """One file's answer, or why it was refused."""

    filename: str
    result: dict[str, Any] | None
    error: str | None
    version: str | None


@get("/detect")
async def detect_page(request: Request[Any, Any, Any], catalog: CatalogDep) -> Template:
    require(request, *DETECT)
    settings: ApiSettings = request.app.state.settings
    return page(
        request,
        "detect.html",
        current=await catalog.current_version(),
        threshold=settings.detect_threshold,
        max_mb=settings.max_image_bytes // (1024 * 1024),
        max_files=settings.max_batch_images,
    )


async def _one(
    request: Request[Any, Any, Any],
    model_server: Any,
    upload: UploadFile,
    top_k: int,
    threshold: float,
) -> Outcome:
    settings: ApiSettings = request.app.state.settings
    name = upload.filename or "image"
    data = await upload.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        mb = settings.max_image_bytes // (1024 * 1024)
        return Outcome(name, None, f"too large: the limit is {mb} MB", None)
    try:
        version, results = await detect(
            model_server, [data], top_k=top_k, threshold=threshold
        )
    except ImageInputError as exc:
        return Outcome(name, None, str(exc), None)
    await detection_log_of(request).record(
        actor_of(require(request, *DETECT)),
        version.name,
        [(image_digest(data), results[0])],
    )
    observe_detections(version.name, results)
    return Outcome(name, results[0], None, version.name)


def detect_handler(settings: ApiSettings) -> Any:
    """``POST /detect`` with the body limit of a full batch of maximal images."""

    @post("/detect", status_code=200, request_max_body_size=settings.batch_body_limit)
    async def detect_images(
        request: Request[Any, Any, Any],
        model_server: ServerDep,
        data: Annotated[DetectForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    ) -> Template:
        """Each file answered on its own: a bad file is named, the rest answered."""
        require(request, *DETECT)
        top_k = min(max(int(data.top_k), 1), 10)
        threshold = min(max(float(data.threshold), 0.0), 1.0)
        uploads = data.images[: settings.max_batch_images]
        started = time.perf_counter()
        outcomes = [
            await _one(request, model_server, u, top_k, threshold) for u in uploads
        ]
        return page(
            request,
            "_detect_results.html",
            outcomes=outcomes,
            dropped=len(data.images) - len(uploads),
            threshold=threshold,
            wall_ms=(time.perf_counter() - started) * 1000,
        )

    return detect_images


def _filter(
    category: str, version: str | None, day_from: str, day_to: str
) -> DetectionFilter:
    def day(text: str) -> datetime | None:
        if not text:
            return None
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)

    until = day(day_to)
    return DetectionFilter(
        class_index=int(category) if category else None,
        model_version=version or None,
        since=day(day_from),
        until=until + timedelta(days=1) if until else None,
    )


Day = Annotated[str, Parameter(max_length=10, pattern=r"^(\d{4}-\d{2}-\d{2})?$")]
Category = Annotated[str, Parameter(max_length=9, pattern=r"^\d*$")]
"""A class index, or "" for any (a form's empty choice)."""


@get("/detections")
async def history_page(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    category: Category = "",
    version: Annotated[str | None, Parameter(max_length=255)] = None,
    day_from: Day = "",
    day_to: Day = "",
    offset: Annotated[int, Parameter(ge=0, le=10**9)] = 0,
) -> Template:
    require(request, *READ)
    where = _filter(category, version, day_from, day_to)
    items = await catalog.list_detections(
        limit=HISTORY_PAGE, offset=offset, where=where
    )
    snapshot = await catalog.snapshot()
    return page(
        request,
        "detections.html",
        items=items,
        total=await catalog.count_detections(where),
        offset=offset,
        page_size=HISTORY_PAGE,
        names={e.index: e.name for e in snapshot.entries},
        versions=[v.name for v in await catalog.list_version_briefs(limit=200)],
        f={
            "category": int(category) if category else None,
            "version": version or "",
            "day_from": day_from,
            "day_to": day_to,
        },
    )


@get("/detections.csv")
async def history_csv(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    category: Category = "",
    version: Annotated[str | None, Parameter(max_length=255)] = None,
    day_from: Day = "",
    day_to: Day = "",
) -> Response[str]:
    """The filtered history as CSV (newest first, at most ``CSV_MAX`` rows)."""
    require(request, *READ)
    where = _filter(category, version, day_from, day_to)
    items = await catalog.list_detections(limit=CSV_MAX, where=where)
    names = {e.index: e.name for e in (await catalog.snapshot()).entries}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "at",
            "actor",
            "image_sha256",
            "model_version",
            "detected",
            "top_class",
            "top_class_index",
            "top_confidence",
            "inference_time_ms",
        ]
    )
    for d in items:
        writer.writerow(
            [
                d.at.isoformat(),
                d.actor,
                d.image_sha256,
                d.model_version,
                d.detected,
                ("" if d.top_class_index is None else names.get(d.top_class_index, "")),
                d.top_class_index,
                d.top_confidence,
                round(d.inference_time_ms, 3),
            ]
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="detections.csv"'},
    )


@get("/audit")
async def audit_page(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    action: Annotated[str | None, Parameter(max_length=64)] = None,
    offset: Annotated[int, Parameter(ge=0, le=10**9)] = 0,
) -> Template:
    require(request, *WRITE)
    return page(
        request,
        "audit.html",
        items=await catalog.list_audit(action=action or None, limit=50, offset=offset),
        total=await catalog.count_audit(action=action or None),
        action=action or "",
        offset=offset,
        page_size=50,
    )


HANDLERS = [detect_page, history_page, history_csv, audit_page]
