"""Rendering for the console: the shared page context and errors as HTML.

Every page template gets the signed-in key, its CSRF token and the navigation
its role may see; every error a console route raises becomes a readable page
(or, for an htmx request, a message swapped into the page's ``#flash`` area) —
never a stack trace and never the API's JSON.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, PermissionDeniedException
from litestar.response import Template
from litestar.types import ExceptionHandlersMap

from admin_api.auth import DETECT, READ, WRITE
from admin_api.console.auth import is_htmx
from admin_api.problems import DOMAIN_STATUS
from fedobj.errors import FedObjError

log = logging.getLogger("admin_api.console")

NAV: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("/", "Overview", READ),
    ("/catalog", "Catalog", READ),
    ("/versions", "Versions", READ),
    ("/runs", "Runs", READ),
    ("/nodes", "Nodes", READ),
    ("/detect", "Detect", DETECT),
    ("/detections", "History", READ),
    ("/audit", "Audit log", WRITE),
)


def base_context(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """What every template may use: who, their token, their navigation."""
    who = getattr(request.state, "principal", None)
    role = who.role if who is not None else None
    return {
        "user": who,
        "role": role,
        "csrf": getattr(request.state, "csrf", ""),
        "path": request.url.path,
        "nav": [(href, label) for href, label, roles in NAV if role in roles],
        "can_write": role in WRITE,
        "can_read": role in READ,
        "can_detect": role in DETECT,
    }


def page(
    request: Request[Any, Any, Any],
    template: str,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> Template:
    """A template response with the shared context."""
    return Template(
        template_name=template,
        context={**base_context(request), **context},
        status_code=status_code,
        headers=headers,
        media_type=MediaType.HTML,
    )


def _message(request: Request[Any, Any, Any], status: int, text: str) -> Response[Any]:
    if is_htmx(request):
        return page(
            request,
            "_flash.html",
            status_code=status,
            headers={"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"},
            level="error",
            message=text,
        )
    return page(request, "error.html", status_code=status, status=status, message=text)


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    text = str(exc.detail)
    if isinstance(exc, PermissionDeniedException) and exc.status_code == 403:
        text = text or "your key's role may not do this"
    return _message(request, exc.status_code, text)


def _domain(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    for kind, status in DOMAIN_STATUS:
        if isinstance(exc, kind):
            if status >= 500:
                log.error("%s %s: %s", request.method, request.url.path, exc)
            return _message(request, status, str(exc))
    return _internal(request, exc)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _message(request, 500, "something went wrong; the server log has details")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    HTTPException: _http,
    FedObjError: _domain,
    Exception: _internal,
}
