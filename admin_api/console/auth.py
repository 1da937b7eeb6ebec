"""Who is looking at the console, and whether they may do what they ask.

One ``before_request`` hook on the console's router does for cookies what
:class:`admin_api.auth.ApiKeyMiddleware` does for bearer keys: it reads the
session cookie, reads the key's row (so a revoked key is refused at once, not
after a cache expires), and refuses a state-changing request whose CSRF token
or ``Origin`` is wrong. Pages then ask :func:`require` for the roles they need;
the roles are the API's own (:mod:`admin_api.auth`), so a page never allows
what the same key could not do through the API.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from litestar import Request, Response
from litestar.exceptions import PermissionDeniedException
from litestar.response import Redirect

from admin_api.auth import Principal
from admin_api.console.session import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    Session,
    SessionCodec,
    same_origin,
)
from fedobj.catalog import NotFoundError

OPEN_PATHS = ("/login", "/static/")
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CsrfError(PermissionDeniedException):
    """A state-changing request without this session's token, or from elsewhere."""


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    return request.headers.get("hx-request") == "true"


def to_login(request: Request[Any, Any, Any], reason: str = "") -> Response[Any]:
    """Send the browser to the sign-in page (htmx: a full-page redirect)."""
    target = "/login?next=" + quote(request.url.path, safe="/")
    if reason:
        target += "&reason=" + quote(reason)
    if is_htmx(request):
        response: Response[Any] = Response(
            "", status_code=200, headers={"HX-Redirect": target}
        )
    else:
        response = Redirect(target)
    response.delete_cookie(COOKIE, path="/")
    return response


async def load_session(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """The console router's ``before_request``: a response ends the request."""
    path = request.url.path
    if path.startswith(OPEN_PATHS):
        return None
    codec: SessionCodec = request.app.state.session_codec
    session = codec.verify(request.cookies.get(COOKIE))
    if session is None:
        return to_login(request, "expired" if request.cookies.get(COOKIE) else "")
    try:
        record = await request.app.state.catalog.get_api_key(session.key_id)
    except NotFoundError:
        return to_login(request, "revoked")
    if record.revoked_at is not None:
        return to_login(request, "revoked")
    request.state.principal = Principal(record.key_id, record.role)
    request.state.session = session
    request.state.csrf = codec.csrf_token(session)
    if request.method in UNSAFE:
        await check_csrf(request, codec, session)
    return None


async def check_csrf(
    request: Request[Any, Any, Any], codec: SessionCodec, session: Session
) -> None:
    """Refuse a write whose origin is foreign or whose token is not the session's."""
    if not same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise CsrfError("refused: this form was sent from another site")
    token = request.headers.get(CSRF_HEADER)
    if token is None:
        form = await request.form()
        token = form.get(CSRF_FIELD)
    if not codec.csrf_ok(session, token if isinstance(token, str) else None):
        raise CsrfError(
            "refused: the form's security token is missing or stale; "
            "reload the page and try again"
        )


def principal(request: Request[Any, Any, Any]) -> Principal:
    """The signed-in key (set by :func:`load_session`)."""
    who: Principal = request.state.principal
    return who


def require(request: Request[Any, Any, Any], *roles: str) -> Principal:
    """The signed-in key if its role is one of ``roles``; 403 otherwise."""
    who = principal(request)
    if who.role not in roles:
        raise PermissionDeniedException(
            f"a {who.role} key may not do this; it needs one of: {', '.join(roles)}"
        )
    return who
