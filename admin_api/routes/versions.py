"""``/api/v1/versions``: every round's model, rollback and download."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from litestar import Controller, Request, get, post
from litestar.pagination import OffsetPagination
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK

from admin_api.auth import READ, WRITE, allow
from admin_api.routes.common import CatalogDep, Limit, Offset, ServerDep, actor_of
from admin_api.schemas import VersionOut, version_out
from fedobj.catalog import VersionRecord
from fedobj.serving import ModelServer, NoModelError

VersionId = Annotated[
    str, Parameter(description="version id (UUID) or name (v0007)", max_length=255)
]
CHUNK = 256 * 1024
MEDIA = {
    "checkpoint": "application/octet-stream",
    "onnx": "application/onnx",
    "ort": "application/octet-stream",  # ONNX Runtime's ORT format (mobile)
}


def chunks(data: bytes) -> Iterator[bytes]:
    """A download body in pieces (the API's and the console's downloads)."""
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


async def download_stream(
    model_server: ModelServer, version: VersionRecord, fmt: str
) -> Stream:
    """A version's artifact as a download (exported on first request,
    hash-verified, ``X-Content-SHA256``): the API's route and the console's."""
    art = await model_server.artifact(version, fmt)
    return Stream(
        chunks(art.data),
        media_type=MEDIA.get(fmt.split("-")[0], "application/octet-stream"),
        headers={
            "X-Content-SHA256": art.sha256,
            "Content-Length": str(len(art.data)),
            "Content-Disposition": (
                f'attachment; filename="{version.name}-{art.filename}"'
            ),
        },
    )


class VersionController(Controller):
    path = "/versions"
    tags = ["versions"]

    @get("/", guards=[allow(*READ)])
    async def list_versions(
        self,
        catalog: CatalogDep,
        run_id: Annotated[str | None, Parameter(max_length=255)] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> OffsetPagination[VersionOut]:
        """Versions, newest first."""
        items = await catalog.list_versions(run_id=run_id, limit=limit, offset=offset)
        total = await catalog.count_versions(run_id=run_id)
        return OffsetPagination(
            items=[version_out(v) for v in items],
            limit=limit,
            offset=offset,
            total=total,
        )

    @get("/current", guards=[allow(*READ)])
    async def current_version(self, catalog: CatalogDep) -> VersionOut:
        """The version the next round, the next run and ``/detect`` use."""
        current = await catalog.current_version()
        if current is None:
            raise NoModelError("no model version yet: run a federation first")
        return version_out(current)

    @get("/{version_id:str}", guards=[allow(*READ)])
    async def get_version(
        self, catalog: CatalogDep, version_id: VersionId
    ) -> VersionOut:
        return version_out(await catalog.get_version(version_id))

    @post("/{version_id:str}/rollback", guards=[allow(*WRITE)], status_code=HTTP_200_OK)
    async def rollback(
        self,
        catalog: CatalogDep,
        version_id: VersionId,
        request: Request[Any, Any, Any],
    ) -> VersionOut:
        """Make this version current; a running federation continues from it at
        its next round, and ``/detect`` uses it from the next request."""
        moved = await catalog.set_current(version_id, actor=actor_of(request.user))
        return version_out(moved)

    @get("/{version_id:str}/download", guards=[allow(*READ)])
    async def download(
        self,
        catalog: CatalogDep,
        model_server: ServerDep,
        version_id: VersionId,
        format: Literal["checkpoint", "onnx", "onnx-int8", "ort"] = "checkpoint",
    ) -> Stream:
        """The version's checkpoint, ONNX model or ORT-format mobile model (INT8;
        exported on first request), hash-verified, with ``X-Content-SHA256``."""
        version = await catalog.get_version(version_id)
        return await download_stream(model_server, version, format)
