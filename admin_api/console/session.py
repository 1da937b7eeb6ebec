"""Browser sessions for the console: a signed cookie and a CSRF token tied to it.

A person pastes an API key once; the server checks it like a bearer key and
answers with a cookie holding ``<payload>.<signature>``, the payload being the
key's public id, a random session id and an expiry. Nothing secret travels in
it: the signature (HMAC-SHA256 under a key derived from the server's API
secret) is what makes it unforgeable, and the key's row is read again on every
request, so a revoked key's session ends at its next request. The cookie is
HttpOnly (no script reads it) and ``SameSite=Strict`` (no other site's page
sends it).

The CSRF token is HMAC(session id) under another derived key: stateless, one per
session, sent by every form (``csrf_token`` field) and by htmx (``X-CSRF-Token``
header). A request whose token does not match its session is refused, and so is
one whose ``Origin`` names another site.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "fedobj_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 8 * 3600
"""A working day: long enough not to nag, short enough that a forgotten tab's
cookie is useless by the next morning."""


def _derive(secret: bytes, purpose: str) -> bytes:
    # one server secret, separate keys per use: a CSRF token never verifies as
    # a session signature, nor an API-key hash as either
    return hmac.new(secret, f"fedobj-console:{purpose}".encode(), "sha256").digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    """What a valid cookie says: which key signed in, and until when."""

    key_id: str
    sid: str
    expires: float


class SessionCodec:
    """Signs and verifies session cookies and their CSRF tokens."""

    def __init__(self, secret: bytes, ttl_s: float = SESSION_SECONDS) -> None:
        self._sign_key = _derive(secret, "session")
        self._csrf_key = _derive(secret, "csrf")
        self.ttl_s = ttl_s

    def issue(self, key_id: str, now: float | None = None) -> tuple[str, Session]:
        """A fresh cookie value (new session id) for ``key_id``."""
        now = time.time() if now is None else now
        session = Session(key_id, secrets.token_urlsafe(16), now + self.ttl_s)
        payload = _b64(
            json.dumps(
                {"k": session.key_id, "s": session.sid, "e": int(session.expires)},
                separators=(",", ":"),
            ).encode()
        )
        return f"{payload}.{self._sign(payload)}", session

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None if forged, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(str(data["k"]), str(data["s"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        now = time.time() if now is None else now
        return session if session.expires > now else None

    def csrf_token(self, session: Session) -> str:
        return _b64(
            hmac.new(self._csrf_key, session.sid.encode(), hashlib.sha256).digest()
        )

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._sign_key, payload.encode(), hashlib.sha256).digest())


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` (when the browser sent one) is this site.

    Browsers send ``Origin`` on cross-site POSTs; a missing header means an old
    browser or a non-browser client, which the CSRF token still covers.
    """
    if not origin:
        return True
    return bool(host) and urlsplit(origin).netloc.lower() == str(host).lower()
