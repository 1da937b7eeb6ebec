"""Authentication and authorisation on every route: 401 without a valid key, 403
for a role that may not, and the role that may gets through."""

from __future__ import annotations

import time

import pytest
from litestar.testing import TestClient

from admin_api import ApiSettings, create_app
from fedobj.apikeys import hash_token, key_id_of, load_secret, token_matches
from tests.admin_api.conftest import ApiEnv, png_bytes

V1 = "/api/v1"
PNG = png_bytes(__import__("numpy").full((28, 28), 128, dtype="uint8"))

# (method, path, kwargs, roles allowed)
WRITES = [
    ("POST", f"{V1}/categories", {"json": {"name": "Glove"}}, {"admin"}),
    ("PATCH", f"{V1}/categories/bag", {"json": {"description": "x"}}, {"admin"}),
    ("DELETE", f"{V1}/categories/bag", {}, {"admin"}),
    ("POST", f"{V1}/versions/v0001/rollback", {}, {"admin"}),
    ("DELETE", f"{V1}/nodes/7", {}, {"admin"}),
    (
        "POST",
        f"{V1}/detect",
        {"files": {"image": ("a.png", PNG, "image/png")}},
        {"admin", "device"},
    ),
    (
        "POST",
        f"{V1}/detect/batch",
        {"files": [("images", ("a.png", PNG, "image/png"))]},
        {"admin", "device"},
    ),
]
READS = [
    ("GET", f"{V1}/categories", {}, {"admin", "viewer", "device"}),
    ("GET", f"{V1}/categories/bag/stats", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/versions", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/versions/current", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/versions/v0001/download", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/runs", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/nodes", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/detections", {}, {"admin", "viewer"}),
    ("GET", f"{V1}/audit", {}, {"admin"}),
    ("GET", "/metrics", {}, {"admin", "viewer"}),
]
ROUTES = WRITES + READS


def _ids(route: tuple[str, str, dict, set[str]]) -> str:  # type: ignore[type-arg]
    return f"{route[0]} {route[1]}"


@pytest.mark.parametrize("route", ROUTES, ids=[_ids(r) for r in ROUTES])
def test_every_route_needs_a_valid_key_and_the_right_role(
    api: ApiEnv,
    route: tuple[str, str, dict, set[str]],  # type: ignore[type-arg]
) -> None:
    method, path, kwargs, allowed = route
    c = api.client
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer fo_0123456789_" + "A" * 43},  # well-formed, unknown
        {"Authorization": f"Bearer {api.keys['admin'][:-2]}xx"},  # tampered secret
    ]
    for headers in bad_headers:
        resp = c.request(method, path, headers=headers, **kwargs)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")
    for role in ("admin", "viewer", "device"):
        resp = c.request(method, path, headers=api.auth(role), **kwargs)
        if role in allowed:
            assert resp.status_code not in (401, 403), (role, resp.text)
        else:
            assert resp.status_code == 403, (role, resp.text)
            assert role in resp.json()["detail"]


def test_revoked_key_is_refused(api: ApiEnv) -> None:
    viewer = api.auth("viewer")
    assert api.client.get(f"{V1}/categories", headers=viewer).status_code == 200
    key_id = key_id_of(api.keys["viewer"])
    assert key_id is not None
    api.catalog.revoke_api_key(key_id, actor="cli:test")
    assert api.client.get(f"{V1}/categories", headers=viewer).status_code == 401
    revoke = api.catalog.list_audit(action="key.revoke")
    assert revoke[0].target == key_id and revoke[0].actor == "cli:test"


def test_a_key_revoked_elsewhere_is_refused_within_a_second(
    api: ApiEnv, catalog_url: str
) -> None:
    """With the default key cache (1 s), as ``fedobj admin serve`` runs."""
    settings = ApiSettings(
        outputs_dir=api.outputs, database_url=catalog_url, rate_limit_per_second=0
    )
    assert settings.key_cache_seconds <= 1.0
    viewer = api.auth("viewer")
    with TestClient(create_app(settings)) as client:
        assert client.get(f"{V1}/categories", headers=viewer).status_code == 200
        key_id = key_id_of(api.keys["viewer"])
        assert key_id is not None
        api.catalog.revoke_api_key(key_id)  # another connection, as the CLI
        time.sleep(settings.key_cache_seconds + 0.05)
        assert client.get(f"{V1}/categories", headers=viewer).status_code == 401


def test_keys_are_stored_only_as_keyed_hashes(api: ApiEnv) -> None:
    secret = load_secret(api.outputs / "api-secret", create=False)
    for token in api.keys.values():
        key_id = key_id_of(token)
        assert key_id is not None
        stored = [k for k in api.catalog.list_api_keys() if k.key_id == key_id][0]
        assert token not in stored.key_hash and stored.key_hash != token
        assert stored.key_hash == hash_token(secret, token)
        assert token_matches(secret, token, stored.key_hash)
        assert not token_matches(b"another-secret-of-16+", token, stored.key_hash)


def test_last_used_is_recorded(api: ApiEnv) -> None:
    api.client.get(f"{V1}/categories", headers=api.auth("viewer"))
    used = {k.name: k.last_used_at for k in api.catalog.list_api_keys()}
    assert used["viewer"] is not None and used["device"] is None
