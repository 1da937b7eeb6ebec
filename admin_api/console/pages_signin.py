"""Sign in with an API key, sign out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect, Template

from admin_api.auth import touch
from admin_api.console.auth import CsrfError
from admin_api.console.render import page
from admin_api.console.session import COOKIE, SessionCodec, same_origin
from fedobj.apikeys import key_id_of, token_matches
from fedobj.catalog import NotFoundError

REASONS = {
    "expired": "Your session has expired; sign in again.",
    "revoked": "That key has been revoked; ask an admin for a new one.",
    "signed-out": "You are signed out.",
}
HOME = {"device": "/detect"}


@dataclass
class SignInForm:
    key: str = ""
    next: str = "/"


def _safe_next(target: str, role: str) -> str:
    """Only paths on this site: ``//evil.example`` is another site."""
    if target.startswith("/") and not target.startswith("//") and target != "/login":
        return target if target != "/" else HOME.get(role, "/")
    return HOME.get(role, "/")


@get("/login", name="console:login")
async def login_page(
    request: Request[Any, Any, Any], next: str = "/", reason: str = ""
) -> Template:
    return page(
        request, "login.html", next=next, notice=REASONS.get(reason), error=None
    )


@post("/login", status_code=303)
async def login(
    request: Request[Any, Any, Any],
    data: Annotated[SignInForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
) -> Response[Any]:
    """Check the pasted key like a bearer key; answer with a session cookie."""
    if not same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise CsrfError("refused: this form was sent from another site")
    state = request.app.state
    token = data.key.strip()
    key_id = key_id_of(token)
    record = None
    if key_id is not None:
        try:
            record = await state.catalog.get_api_key(key_id)
        except NotFoundError:
            record = None
    if (
        record is None
        or record.revoked_at is not None
        or not token_matches(state.api_secret, token, record.key_hash)
    ):
        return page(
            request,
            "login.html",
            status_code=401,
            next=data.next,
            notice=None,
            error="That key is not valid (mistyped, revoked or from another server).",
        )
    await touch(state.catalog, record.key_id)
    codec: SessionCodec = state.session_codec
    cookie, _ = codec.issue(record.key_id)
    response = Redirect(_safe_next(data.next, record.role), status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(codec.ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@post("/logout", status_code=303)
async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
    response = Redirect("/login?reason=signed-out", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


HANDLERS = [login_page, login, logout]
