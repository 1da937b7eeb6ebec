"""Every error as RFC 9457 ``application/problem+json`` with a clear ``detail``.

Domain errors from ``fedobj`` map to statuses here, in one table, so routes just
call the catalog and let errors propagate: a duplicate name is 409, an unknown id
404, a value the catalog refuses 422, an unusable image 400, a database that is
not there or cannot store anything (a full disk: ``DatabaseWriteError``, a kind of
``DatabaseUnavailableError``) 503. Anything unexpected is a 500 whose body says
nothing internal (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from fedobj.apikeys import ApiSecretError
from fedobj.catalog import (
    CatalogValueError,
    ConflictError,
    DatabaseUnavailableError,
    NotFoundError,
)
from fedobj.errors import ConfigError, FedObjError
from fedobj.inference import ImageInputError
from fedobj.registry import ArtifactError
from fedobj.serving import NoModelError, UnknownFormatError

log = logging.getLogger("admin_api")

PROBLEM_JSON = "application/problem+json"

DOMAIN_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (NoModelError, 409),
    (ImageInputError, 400),
    (UnknownFormatError, 400),
    (CatalogValueError, 422),
    (ConfigError, 422),
    (DatabaseUnavailableError, 503),
    (ArtifactError, 500),
    (ApiSecretError, 500),
)


def problem(
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[dict[str, Any]]:
    """A problem+json response (``type`` is ``about:blank``: the status says it)."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return Response(
        body,
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    extra: dict[str, Any] = {}
    detail = str(exc.detail)
    if isinstance(exc, ValidationException) and exc.extra:
        extra["errors"] = exc.extra
        fields = [
            str(e.get("key"))
            for e in exc.extra
            if isinstance(e, dict) and e.get("key") is not None
        ]
        if fields:
            detail = f"{detail}: invalid {', '.join(fields)}"
    return problem(exc.status_code, detail, headers=exc.headers, **extra)


def _domain(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    for kind, status in DOMAIN_STATUS:
        if isinstance(exc, kind):
            if status >= 500:
                log.error("%s %s: %s", request.method, request.url.path, exc)
            return problem(status, str(exc))
    return _internal(request, exc)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal error; the server log has the details")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: _http,
    FedObjError: _domain,
    Exception: _internal,
}

__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "problem"]
