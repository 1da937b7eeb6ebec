"""Bearer API keys and role guards.

Every route but ``/health`` and the schema pages needs ``Authorization: Bearer
<token>``. The middleware finds the key by its public id, compares keyed hashes
in constant time (``fedobj.apikeys``) and attaches a :class:`Principal`; guards
then check the role: 401 for no or a bad key, 403 for a role that may not.
Verified keys are trusted for ``key_cache_seconds`` to spare the database a
lookup per request; a revocation is seen within that time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from fedobj.apikeys import key_id_of, token_matches
from fedobj.catalog import DatabaseWriteError, NotFoundError

log = logging.getLogger("admin_api")

READ = ("admin", "viewer")
WRITE = ("admin",)
DETECT = ("admin", "device")
CATALOG_READ = ("admin", "viewer", "device")
"""Reading the category list: a device's collect page picks categories from it."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's public id and role (``actor`` in the audit)."""

    key_id: str
    role: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"


class KeyCache:
    """Recently verified tokens -> principal, for a few seconds."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, token: str) -> Principal | None:
        hit = self._entries.get(token)
        if hit is None or hit[0] < time.monotonic():
            self._entries.pop(token, None)
            return None
        return hit[1]

    def put(self, token: str, principal: Principal) -> None:
        if len(self._entries) > 10_000:  # bound memory against key spraying
            self._entries.clear()
        self._entries[token] = (time.monotonic() + self.ttl_s, principal)

    def drop_key(self, key_id: str) -> None:
        for token, (_, p) in list(self._entries.items()):
            if p.key_id == key_id:
                self._entries.pop(token, None)


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Resolve ``Authorization: Bearer`` to a :class:`Principal` or answer 401."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException(
                "missing API key: send `Authorization: Bearer <key>` "
                "(create one with `fedobj admin keys create`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        token = token.strip()
        state = connection.app.state
        cache: KeyCache = state.key_cache
        principal = cache.get(token)
        if principal is None:
            principal = await _verify(state, token)
            cache.put(token, principal)
        return AuthenticationResult(user=principal, auth=token)


async def _verify(state: Any, token: str) -> Principal:
    invalid = NotAuthorizedException(
        "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
    )
    key_id = key_id_of(token)
    if key_id is None:
        raise invalid
    try:
        record = await state.catalog.get_api_key(key_id)
    except NotFoundError:
        raise invalid from None
    if record.revoked_at is not None or not token_matches(
        state.api_secret, token, record.key_hash
    ):
        raise invalid
    await touch(state.catalog, key_id)
    return Principal(key_id, record.role)


async def touch(catalog: Any, key_id: str) -> None:
    """Note the key's last use; a database that cannot take writes (a full
    disk) must not turn every read into a 503, so that failure is only logged."""
    try:
        await catalog.touch_api_key(key_id)
    except DatabaseWriteError as exc:
        log.warning("could not record the use of key %s: %s", key_id, exc)


def allow(
    *roles: str,
) -> Callable[
    [ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Coroutine[Any, Any, None]
]:
    """A guard admitting only ``roles`` (403 for any other authenticated key).

    A coroutine on purpose: Litestar runs a plain-function guard in its thread
    pool, a thread hop per request that cost more than the rest of a cached
    read (see the admin plane profile in docs/results.md).
    """

    async def guard(
        connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        principal = connection.user
        if not isinstance(principal, Principal) or principal.role not in roles:
            role = getattr(principal, "role", None)
            raise PermissionDeniedException(
                f"role {role!r} may not do this; needs one of {list(roles)}"
            )

    return guard
