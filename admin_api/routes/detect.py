"""``/api/v1/detect``: what is in this photo, answered by the current version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import ClientException
from litestar.pagination import OffsetPagination
from litestar.params import Body, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from admin_api.auth import DETECT, READ, allow
from admin_api.metrics import observe_detections
from admin_api.routes.common import (
    CatalogDep,
    Limit,
    Offset,
    ServerDep,
    actor_of,
    detection_log_of,
)
from admin_api.schemas import (
    BatchDetectionOut,
    DetectionHistoryOut,
    DetectionOut,
    detection_out,
    history_out,
)
from admin_api.settings import ApiSettings
from fedobj.inference import ImageInputError
from fedobj.serving import detect, image_digest

TopK = Annotated[int, Parameter(ge=1, le=50, description="predictions per image")]
Threshold = Annotated[
    float | None,
    Parameter(ge=0.0, le=1.0, description="confidence for `detected` (default 0.7)"),
]


@dataclass
class ImagesForm:
    """``multipart/form-data`` with one or more file fields ``images``."""

    images: list[UploadFile]


async def _read(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ClientException(
            f"image {upload.filename!r} is over {limit} bytes",
            status_code=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    return data


async def _image_field(request: Request[Any, Any, Any], data: UploadFile) -> UploadFile:
    """The upload in the form field ``image`` (the API's contract).

    The handler takes a bare :class:`UploadFile` because Litestar converts a
    form *model* with per-request type-hint resolution (8% of ``/detect``'s CPU
    under load); the form is parsed once either way, so naming the field here
    is free.
    """
    image = (await request.form()).get("image")
    if not isinstance(image, UploadFile):
        raise ClientException("send the image as the multipart form field `image`")
    return image


def detect_controller(settings: ApiSettings) -> type[Controller]:
    """The detection routes, with body limits taken from ``settings``."""

    class DetectController(Controller):
        path = "/"
        tags = ["detection"]

        @post(
            "/detect",
            guards=[allow(*DETECT)],
            status_code=HTTP_200_OK,
            request_max_body_size=settings.detect_body_limit,
        )
        async def detect_one(
            self,
            model_server: ServerDep,
            request: Request[Any, Any, Any],
            data: Annotated[
                UploadFile,
                Body(
                    media_type=RequestEncodingType.MULTI_PART,
                    description="one image, in the form field `image`",
                    schema_extra={
                        "properties": {"image": {"type": "string", "format": "binary"}},
                        "required": ["image"],
                    },
                ),
            ],
            top_k: TopK = 5,
            threshold: Threshold = None,
        ) -> DetectionOut:
            """Classify one image (field ``image``) with the current version.

            Inactive categories are never predicted. 413 over the size limit;
            400 for anything that is not a decodable image.
            """
            image = await _read(
                await _image_field(request, data), settings.max_image_bytes
            )
            cut = settings.detect_threshold if threshold is None else threshold
            version, results = await detect(
                model_server, [image], top_k=top_k, threshold=cut
            )
            await detection_log_of(request).record(
                actor_of(request.user),
                version.name,
                [(image_digest(image), results[0])],
            )
            observe_detections(version.name, results)
            return detection_out(results[0])

        @post(
            "/detect/batch",
            guards=[allow(*DETECT)],
            status_code=HTTP_200_OK,
            request_max_body_size=settings.batch_body_limit,
        )
        async def detect_batch(
            self,
            model_server: ServerDep,
            request: Request[Any, Any, Any],
            data: Annotated[
                ImagesForm, Body(media_type=RequestEncodingType.MULTI_PART)
            ],
            top_k: TopK = 5,
            threshold: Threshold = None,
        ) -> BatchDetectionOut:
            """Classify up to ``max_batch_images`` images (fields ``images``) in
            one model run; results in upload order."""
            uploads = data.images
            if len(uploads) > settings.max_batch_images:
                raise ClientException(
                    f"{len(uploads)} images; at most {settings.max_batch_images} "
                    "per batch",
                    status_code=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                )
            images = [await _read(u, settings.max_image_bytes) for u in uploads]
            cut = settings.detect_threshold if threshold is None else threshold
            try:
                version, results = await detect(
                    model_server, images, top_k=top_k, threshold=cut
                )
            except ImageInputError as exc:
                raise ImageInputError(f"batch refused: {exc}") from exc
            await detection_log_of(request).record(
                actor_of(request.user),
                version.name,
                [(image_digest(i), r) for i, r in zip(images, results, strict=True)],
            )
            observe_detections(version.name, results)
            return BatchDetectionOut(
                results=[detection_out(r) for r in results], model_version=version.name
            )

        @get("/detections", guards=[allow(*READ)])
        async def history(
            self, catalog: CatalogDep, limit: Limit = 50, offset: Offset = 0
        ) -> OffsetPagination[DetectionHistoryOut]:
            """Past detections, newest first (image hashes, never images)."""
            items = await catalog.list_detections(limit=limit, offset=offset)
            return OffsetPagination(
                items=[history_out(d) for d in items],
                limit=limit,
                offset=offset,
                total=await catalog.count_detections(),
            )

    return DetectController
