"""The web console over HTTP: sign-in, roles, CSRF, the catalog's forms, roll
back, detection and its history — a real app on a real catalog (SQLite and
PostgreSQL) and registry, driven through Litestar's test client the way a
browser would (cookies kept, the CSRF token read from the page)."""

from __future__ import annotations

import csv
import hashlib
import html
import io
import re
import struct
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fedobj.apikeys import key_id_of
from fedobj.catalog import CatalogValueError, ConflictError, NotFoundError
from tests.admin_api.conftest import ApiEnv, png_bytes, register_trained_version

ORIGIN = "http://testserver.local"  # the test client's own site
FOREIGN = "https://evil.example"
HTMX = {"HX-Request": "true"}
PAGES = (
    "/",
    "/catalog",
    "/versions",
    "/versions/v0001",
    "/runs",
    "/nodes",
    "/detect",
    "/detections",
    "/detections.csv",
    "/audit",
)


# ---------------------------------------------------------------- helpers


def _sign_in(api: ApiEnv, role: str, next: str = "/") -> httpx.Response:
    return api.client.post(
        "/login",
        data={"key": api.keys[role], "next": next},
        follow_redirects=False,
    )


def _csrf(page: httpx.Response) -> str:
    match = re.search(r'<body[^>]*\sdata-csrf="([^"]+)"', page.text)
    assert match, page.text[:500]
    return match.group(1)


def _session(api: ApiEnv, role: str) -> str:
    """Sign in as ``role``; the session's CSRF token, read from a page."""
    assert _sign_in(api, role).status_code == 303
    landing = "/detect" if role == "device" else "/catalog"
    page = api.client.get(landing)
    assert page.status_code == 200, page.text
    return _csrf(page)


def _post(
    api: ApiEnv,
    path: str,
    token: str | None,
    data: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A form POST as the page's form sends it (token in the ``csrf_token`` field)."""
    body = dict(data or {})
    if token is not None:
        body["csrf_token"] = token
    return api.client.post(
        path, data=body, headers=headers or {}, follow_redirects=False
    )


def _is_html(resp: httpx.Response) -> bool:
    return resp.headers["content-type"].startswith("text/html")


def _alert(resp: httpx.Response) -> str:
    """The text of the page's first ``role="alert"`` element."""
    match = re.search(r'role="alert"[^>]*>(.*?)</p>', resp.text, re.S)
    assert match, resp.text[:1000]
    return html.unescape(match.group(1)).strip()


def _names(api: ApiEnv) -> list[str]:
    return [c.name for c in api.catalog.list_categories(limit=1000)]


def _set_cookie(resp: httpx.Response) -> str:
    [cookie] = [
        c
        for c in resp.headers.get_list("set-cookie")
        if c.startswith("fedobj_session=")
    ]
    return cookie


def _add_run(api: ApiEnv) -> None:
    """A run with one finished round and its per-node rows."""
    c = api.catalog
    c.begin_run("run-1", strategy="fedavg", model="cnn", first_round=1, last_round=3)
    c.start_round("run-1", 1, sampled=2)
    c.record_node_round(
        "run-1", 1, 11, "train", num_examples=40, train_seconds=1.5, dp_epsilon=0.4
    )
    c.record_node_round("run-1", 1, 12, "train", error="shape: wrong head")
    c.record_node_round("run-1", 1, 11, "evaluate", num_examples=10, accuracy=0.8)
    c.finish_round("run-1", 1, replied=1, rejected=1, accuracy=0.7, loss=0.9)
    c.upsert_node(11, samples=50, label_names=["bag", "coat"], dp_epsilon=0.4)


# ---------------------------------------------------------------- signing in


def test_a_page_without_a_session_redirects_to_sign_in(api: ApiEnv) -> None:
    resp = api.client.get("/catalog", follow_redirects=False)
    assert resp.status_code in (302, 303)
    assert resp.headers["location"] == "/login?next=/catalog"
    assert (
        api.client.get("/", follow_redirects=False)
        .headers["location"]
        .startswith("/login")
    )
    # htmx asks for a full-page redirect rather than a fragment of the login page
    frag = api.client.get("/overview/panel", headers=HTMX, follow_redirects=False)
    assert frag.headers["HX-Redirect"].startswith("/login?next=/overview/panel")
    assert api.client.get("/login").status_code == 200


def test_a_bad_key_gets_a_readable_401(api: ApiEnv) -> None:
    for key in ("fo_notakey", "", "not even the right shape", api.keys["admin"] + "x"):
        resp = api.client.post(
            "/login", data={"key": key, "next": "/"}, follow_redirects=False
        )
        assert resp.status_code == 401, key
        assert _is_html(resp)
        assert "That key is not valid" in _alert(resp)
        assert "set-cookie" not in resp.headers
    assert api.client.get("/", follow_redirects=False).status_code in (302, 303)


def test_a_good_key_gets_a_session_cookie(api: ApiEnv) -> None:
    resp = _sign_in(api, "admin", next="/versions")
    assert resp.status_code == 303
    assert resp.headers["location"] == "/versions"
    cookie = _set_cookie(resp)
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs
    assert "samesite=strict" in attrs
    assert "path=/" in attrs
    assert "max-age=28800" in attrs  # eight hours
    assert api.keys["admin"] not in cookie  # the key itself never travels back
    assert api.client.get("/versions").status_code == 200


def test_sign_in_never_redirects_to_another_site(api: ApiEnv) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/login"):
        resp = _sign_in(api, "admin", next=target)
        assert resp.headers["location"] == "/", target


def test_sign_in_from_another_site_is_refused(api: ApiEnv) -> None:
    resp = api.client.post(
        "/login",
        data={"key": api.keys["admin"], "next": "/"},
        headers={"Origin": FOREIGN},
        follow_redirects=False,
    )
    assert resp.status_code == 403
    assert "set-cookie" not in resp.headers


def test_a_forged_cookie_is_sent_to_sign_in(api: ApiEnv) -> None:
    _sign_in(api, "viewer")
    value = api.client.cookies["fedobj_session"]
    payload, signature = value.split(".")
    api.client.cookies.set("fedobj_session", f"{payload}.x{signature[1:]}")
    resp = api.client.get("/catalog", follow_redirects=False)
    assert resp.headers["location"] == "/login?next=/catalog&reason=expired"


def test_every_page_answers_an_admin(api: ApiEnv) -> None:
    _add_run(api)
    _session(api, "admin")
    for path in (*PAGES, "/runs/run-1", "/overview/panel"):
        resp = api.client.get(path, follow_redirects=False)
        assert resp.status_code == 200, (path, resp.text[:500])
    overview = api.client.get("/").text
    assert "run-1" in overview and "1 of 3" in overview
    assert "round 1: 1/2 nodes, 1 rejected (shape)" in overview
    nodes = api.client.get("/runs/run-1?round=1", headers=HTMX)
    assert "<html" not in nodes.text  # the fragment alone
    assert "shape: wrong head" in nodes.text and "1.50 s" in nodes.text
    assert api.client.get("/overview/series").json()["central_accuracy"] == [0.7]
    version = api.client.get("/versions/v0001").text
    assert "75.0%" in version  # class-0-accuracy from the version's metrics


def test_missing_things_are_readable_404s(api: ApiEnv) -> None:
    _session(api, "admin")
    for path in ("/versions/v9999", "/runs/no-such-run", "/catalog/no-such/edit"):
        resp = api.client.get(path)
        assert resp.status_code == 404, path
        assert _is_html(resp) and "Not found" in resp.text


def test_a_checkpoint_downloads_with_its_hash(api: ApiEnv) -> None:
    _session(api, "viewer")
    resp = api.client.get("/versions/v0001/download/checkpoint")
    assert resp.status_code == 200
    assert hashlib.sha256(resp.content).hexdigest() == api.version.checkpoint_sha256
    assert resp.headers["X-Content-SHA256"] == api.version.checkpoint_sha256
    assert api.client.get("/versions/v0001/download/zip").status_code == 400


# ---------------------------------------------------------------- roles


def _refused(resp: httpx.Response) -> None:
    assert resp.status_code == 403, resp.text[:500]
    assert _is_html(resp), resp.headers["content-type"]
    assert "may not do this" in _alert(resp)


def test_a_viewer_reads_but_may_not_write_or_detect(
    api: ApiEnv,
    test_images: tuple[list[bytes], np.ndarray],
    trained_state: dict[str, torch.Tensor],
) -> None:
    token = _session(api, "viewer")
    for path in ("/", "/catalog", "/versions", "/detections", "/detections.csv"):
        assert api.client.get(path).status_code == 200, path
    _refused(api.client.get("/audit"))
    _refused(api.client.get("/detect"))
    _refused(api.client.get("/catalog/trouser/edit"))
    before = _names(api)
    _refused(_post(api, "/catalog", token, {"name": "Sun hat"}))
    _refused(_post(api, "/catalog/trouser/deactivate", token))
    _refused(_post(api, "/catalog/trouser/delete", token))
    assert _names(api) == before and api.catalog.get_category("trouser").is_active
    newer = register_trained_version(
        api.catalog, api.store, trained_state, api.catalog.snapshot(), round=2
    )
    _refused(_post(api, "/versions/v0001/rollback", token))
    assert api.catalog.current_version().name == newer.name  # type: ignore[union-attr]
    detect = api.client.post(
        "/detect",
        files={"images": ("a.png", test_images[0][0], "image/png")},
        headers={"X-CSRF-Token": token},
    )
    _refused(detect)
    # the nav offers a viewer neither page
    page = api.client.get("/catalog").text
    assert 'href="/audit"' not in page and 'href="/detect"' not in page


def test_a_device_detects_and_nothing_else(api: ApiEnv) -> None:
    _session(api, "device")
    resp = api.client.get("/", follow_redirects=False)
    assert resp.status_code in (302, 303) and resp.headers["location"] == "/detect"
    assert api.client.get("/detect").status_code == 200
    for path in ("/catalog", "/audit", "/versions", "/detections", "/nodes"):
        _refused(api.client.get(path))
    # signing in lands a device on its one page
    assert _sign_in(api, "device").headers["location"] == "/detect"


def test_an_htmx_refusal_is_a_fragment_for_the_flash_area(api: ApiEnv) -> None:
    token = _session(api, "viewer")
    resp = _post(api, "/catalog", token, {"name": "Sun hat"}, headers=HTMX)
    assert resp.status_code == 403
    assert resp.headers["HX-Retarget"] == "#flash"
    assert "<html" not in resp.text and "may not do this" in _alert(resp)


# ---------------------------------------------------------------- CSRF


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    api: ApiEnv,
) -> None:
    token = _session(api, "admin")
    before = _names(api)
    for sent in (None, "", "not-the-token", token[:-1]):
        resp = _post(api, "/catalog", sent, {"name": "Sun hat"})
        assert resp.status_code == 403, sent
        assert _is_html(resp) and "security token" in _alert(resp)
    resp = _post(api, "/catalog/trouser/deactivate", None)
    assert resp.status_code == 403
    assert _names(api) == before
    assert api.catalog.get_category("trouser").is_active
    # the token of another session of the same key is not this session's
    other = _session(api, "admin")
    assert other != token
    assert _post(api, "/catalog", token, {"name": "Sun hat"}).status_code == 403
    assert _names(api) == before


def test_a_post_from_another_site_is_refused(api: ApiEnv) -> None:
    token = _session(api, "admin")
    before = _names(api)
    resp = _post(api, "/catalog", token, {"name": "Sun hat"}, {"Origin": FOREIGN})
    assert resp.status_code == 403 and "another site" in _alert(resp)
    assert _names(api) == before
    ok = _post(api, "/catalog", token, {"name": "Sun hat"}, {"Origin": ORIGIN})
    assert ok.status_code == 303
    assert "Sun hat" in _names(api)


def test_the_csrf_header_is_accepted_like_the_field(api: ApiEnv) -> None:
    token = _session(api, "admin")
    resp = api.client.post(
        "/catalog",
        data={"name": "Sun hat"},
        headers={"X-CSRF-Token": token},
        follow_redirects=False,
    )
    assert resp.status_code == 303 and "Sun hat" in _names(api)


# ---------------------------------------------------------------- revoke, logout


def test_a_revoked_key_is_signed_out_at_its_next_request(api: ApiEnv) -> None:
    _session(api, "viewer")
    assert api.client.get("/catalog").status_code == 200
    key_id = key_id_of(api.keys["viewer"])
    assert key_id is not None
    api.catalog.revoke_api_key(key_id)
    resp = api.client.get("/catalog", follow_redirects=False)
    assert resp.status_code in (302, 303)
    assert resp.headers["location"] == "/login?next=/catalog&reason=revoked"
    login = api.client.get(resp.headers["location"])
    assert "revoked" in login.text
    # and the key cannot sign in again
    assert _sign_in(api, "viewer").status_code == 401


def test_sign_out_clears_the_cookie(api: ApiEnv) -> None:
    token = _session(api, "admin")
    resp = _post(api, "/logout", token)
    assert resp.status_code == 303
    assert resp.headers["location"] == "/login?reason=signed-out"
    cleared = _set_cookie(resp).lower()
    assert re.search(r"max-age=0\b", cleared) or "expires=thu, 01 jan 1970" in cleared
    assert "fedobj_session" not in api.client.cookies
    after = api.client.get("/catalog", follow_redirects=False)
    assert after.headers["location"].startswith("/login")


# ---------------------------------------------------------------- catalog forms


def _field_error(resp: httpx.Response) -> str:
    match = re.search(r'<p id="new-name-error"[^>]*>(.*?)</p>', resp.text, re.S)
    assert match, resp.text[:1000]
    return html.unescape(match.group(1))


@pytest.mark.parametrize(
    "name, status, error",
    [
        ("Trouser", 409, ConflictError),
        ("  TROUSER ", 409, ConflictError),
        ("Bad\x07name", 422, CatalogValueError),
        ("", 422, CatalogValueError),
    ],
    ids=["duplicate", "duplicate-other-case", "control-character", "empty"],
)
def test_a_refused_category_shows_the_catalogs_message_by_the_name_field(
    api: ApiEnv, name: str, status: int, error: type[Exception]
) -> None:
    token = _session(api, "admin")
    before = _names(api)
    resp = api.client.post(
        "/catalog",
        data={"name": name, "description": "kept", "csrf_token": token},
        headers={**HTMX, "X-CSRF-Token": token},
    )
    assert resp.status_code == status, resp.text[:500]
    assert "<html" not in resp.text  # the add form alone, for htmx to swap
    with pytest.raises(error) as refused:
        api.catalog.add_category(name)
    assert _field_error(resp) == str(refused.value)
    assert 'aria-describedby="new-name-error"' in resp.text
    assert 'value="kept"' in resp.text  # what was typed stays in the form
    assert _names(api) == before


def test_a_refused_category_without_htmx_is_the_whole_page(api: ApiEnv) -> None:
    token = _session(api, "admin")
    resp = _post(api, "/catalog", token, {"name": "trouser"})
    assert resp.status_code == 409
    assert "<html" in resp.text and "already exists" in _field_error(resp)


def test_an_added_category_triggers_a_table_refresh(api: ApiEnv) -> None:
    token = _session(api, "admin")
    resp = api.client.post(
        "/catalog",
        data={"name": "Sun hat", "description": "wide brim"},
        headers={**HTMX, "X-CSRF-Token": token},
    )
    assert resp.status_code == 201, resp.text[:500]
    assert resp.headers["HX-Trigger"] == "catalog-changed"
    assert "Added “Sun hat” as class 10" in html.unescape(resp.text)
    made = api.catalog.get_category("sun-hat")
    assert (made.name, made.description, made.class_index) == (
        "Sun hat",
        "wide brim",
        10,
    )
    table = api.client.get(
        "/catalog", headers={**HTMX, "HX-Target": "category-table"}
    ).text
    assert '<tr data-slug="sun-hat">' in table and "<html" not in table
    found = api.client.get("/catalog?q=sun").text
    assert "sun-hat" in found and "trouser" not in found
    audit = api.catalog.list_audit(action="category.create")
    assert audit[0].actor == f"key:{key_id_of(api.keys['admin'])}"


def _edit_form(api: ApiEnv, slug: str) -> str:
    page = api.client.get(f"/catalog/{slug}/edit")
    assert page.status_code == 200
    match = re.search(r'name="updated_at" value="([^"]+)"', page.text)
    assert match
    return html.unescape(match.group(1))


def test_an_edit_saves_and_a_stale_edit_is_refused(api: ApiEnv) -> None:
    token = _session(api, "admin")
    stamp = _edit_form(api, "trouser")
    saved = _post(
        api,
        "/catalog/trouser",
        token,
        {
            "name": "Trousers",
            "description": "long",
            "is_active": "on",
            "updated_at": stamp,
        },
    )
    assert saved.status_code == 303, saved.text[:500]
    now = api.catalog.get_category("trouser")
    assert (now.name, now.description, now.is_active) == ("Trousers", "long", True)

    stale = _edit_form(api, "trouser")
    api.catalog.update_category("trouser", description="changed meanwhile")
    resp = _post(
        api,
        "/catalog/trouser",
        token,
        {"name": "Pants", "description": "mine", "is_active": "", "updated_at": stale},
    )
    assert resp.status_code == 409
    assert "changed by someone else" in _alert(resp)
    assert "changed meanwhile" in resp.text  # the current values are shown
    after = api.catalog.get_category("trouser")
    assert (after.name, after.description, after.is_active) == (
        "Trousers",
        "changed meanwhile",
        True,
    )


@pytest.mark.parametrize(
    "name, status, error",
    [("Sneaker", 409, ConflictError), ("Bad\x07name", 422, CatalogValueError)],
    ids=["duplicate", "control-character"],
)
def test_an_edit_to_a_refused_name_shows_the_catalogs_message_by_the_field(
    api: ApiEnv, name: str, status: int, error: type[Exception]
) -> None:
    token = _session(api, "admin")
    stamp = _edit_form(api, "trouser")
    form = {"name": name, "description": "d", "is_active": "on", "updated_at": stamp}
    resp = _post(api, "/catalog/trouser", token, form)
    assert resp.status_code == status
    match = re.search(r'<p id="name-error"[^>]*>(.*?)</p>', resp.text, re.S)
    with pytest.raises(error) as refused:
        api.catalog.update_category("trouser", name=name)
    assert match and html.unescape(match.group(1)) == str(refused.value)
    after = api.catalog.get_category("trouser")
    assert (after.name, after.description) == ("Trouser", "")


def test_an_edit_without_the_active_box_deactivates(api: ApiEnv) -> None:
    token = _session(api, "admin")
    stamp = _edit_form(api, "coat")
    form = {"name": "Coat", "description": "", "updated_at": stamp}
    assert _post(api, "/catalog/coat", token, form).status_code == 303
    assert not api.catalog.get_category("coat").is_active
    page = api.client.get("/catalog/coat/edit").text
    assert not re.search(r'id="is_active"[^>]*checked', page)


def test_deactivate_and_delete(api: ApiEnv) -> None:
    token = _session(api, "admin")
    resp = _post(api, "/catalog/trouser/deactivate", token)
    assert resp.status_code == 303 and resp.headers["location"] == "/catalog"
    assert not api.catalog.get_category("trouser").is_active

    # a category v0001 was trained on: deactivate, never delete
    resp = _post(api, "/catalog/trouser/delete", token)
    assert resp.status_code == 409
    assert _is_html(resp) and "deactivate it instead" in _alert(resp)
    assert api.catalog.get_category("trouser").class_index == 1

    api.catalog.add_category("Sun hat")
    page = api.client.get("/catalog").text
    assert 'action="/catalog/sun-hat/delete"' in page  # offered for it alone
    assert 'action="/catalog/trouser/delete"' not in page
    resp = _post(api, "/catalog/sun-hat/delete", token)
    assert resp.status_code == 303
    with pytest.raises(NotFoundError):
        api.catalog.get_category("sun-hat")
    assert _post(api, "/catalog/sun-hat/delete", token).status_code == 404


def test_rollback_makes_the_version_current(
    api: ApiEnv, trained_state: dict[str, torch.Tensor]
) -> None:
    newer = register_trained_version(
        api.catalog, api.store, trained_state, api.catalog.snapshot(), round=2
    )
    assert api.catalog.current_version().name == newer.name  # type: ignore[union-attr]
    token = _session(api, "admin")
    assert "Roll back to v0001" in api.client.get("/versions/v0001").text
    resp = _post(api, "/versions/v0001/rollback", token)
    assert resp.status_code == 303
    assert resp.headers["location"] == "/versions/v0001"
    assert api.catalog.current_version().name == "v0001"  # type: ignore[union-attr]
    assert "Roll back to v0001" not in api.client.get("/versions/v0001").text
    assert _post(api, "/versions/v9999/rollback", token).status_code == 404


# ---------------------------------------------------------------- detect


def _articles(resp: httpx.Response) -> dict[str, str]:
    """Each answered file's card, by file name."""
    cards = re.findall(r"<article.*?</article>", resp.text, re.S)
    out = {}
    for card in cards:
        name = re.search(r"<h3>(.*?)</h3>", card, re.S)
        assert name
        out[html.unescape(name.group(1))] = card
    return out


def _detect(
    api: ApiEnv, token: str, files: list[tuple[str, bytes]], **form: Any
) -> httpx.Response:
    return api.client.post(
        "/detect",
        files=[("images", (n, d, "application/octet-stream")) for n, d in files],
        data={"top_k": "3", "threshold": "0.2", **form},
        headers={"X-CSRF-Token": token},
    )


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels: over Pillow's guard."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def test_detect_answers_each_file_and_names_the_refused_one(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    images, _ = test_images
    token = _session(api, "device")
    resp = _detect(
        api,
        token,
        [
            ("shirt.png", images[0]),
            ("notes.txt", b"not an image"),
            ("bag.png", images[8]),
        ],
    )
    assert resp.status_code == 200, resp.text[:500]
    cards = _articles(resp)
    assert list(cards) == ["shirt.png", "notes.txt", "bag.png"]
    assert "refused" in cards["notes.txt"] and "Refused:" in cards["notes.txt"]
    assert "image" in _alert_in(cards["notes.txt"]).lower()
    for name in ("shirt.png", "bag.png"):
        assert "Refused" not in cards[name]
        assert "v0001" in cards[name]
        assert len(re.findall(r"<li>", cards[name])) == 3  # top-3


def _alert_in(card: str) -> str:
    match = re.search(r'role="alert"[^>]*>(.*?)</p>', card, re.S)
    assert match
    return html.unescape(match.group(1))


def test_detect_refuses_an_oversized_file_and_answers_the_rest(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    token = _session(api, "admin")
    limit = 10 * 1024 * 1024  # ApiSettings.max_image_bytes, the fixture's default
    big = png_bytes(np.zeros((64, 64), dtype=np.uint8)) + b"\0" * limit
    resp = _detect(api, token, [("huge.png", big), ("ok.png", test_images[0][0])])
    assert resp.status_code == 200
    cards = _articles(resp)
    assert "too large: the limit is 10 MB" in _alert_in(cards["huge.png"])
    assert "Refused" not in cards["ok.png"]


def test_detect_refuses_a_decompression_bomb_and_keeps_answering(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    token = _session(api, "admin")
    resp = _detect(api, token, [("bomb.png", _bomb_png())])
    assert resp.status_code == 200
    assert "pixels" in _alert_in(_articles(resp)["bomb.png"])
    again = _detect(api, token, [("ok.png", test_images[0][0])])
    assert "Refused" not in _articles(again)["ok.png"]


def test_detect_of_a_really_big_1_bit_image_is_refused(api: ApiEnv) -> None:
    """A real 1-bit PNG of 20000 x 20000 pixels: 400 MP that compress to ~60 kB."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 1024 * 1024
    token = _session(api, "admin")
    resp = _detect(api, token, [("white.png", buf.getvalue())])
    assert resp.status_code == 200
    assert "decompression bomb" in _alert_in(_articles(resp)["white.png"])


def test_detect_without_a_file_or_with_too_many(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    token = _session(api, "admin")
    five = [(f"{i}.png", test_images[0][i]) for i in range(5)]  # the fixture allows 4
    resp = _detect(api, token, five)
    assert resp.status_code == 200
    assert list(_articles(resp)) == ["0.png", "1.png", "2.png", "3.png"]
    assert "1 more file(s) were not read" in resp.text
    none = api.client.post(
        "/detect", data={"top_k": "3"}, headers={"X-CSRF-Token": token}
    )
    assert none.status_code == 400 and _is_html(none)


def _csv(api: ApiEnv, query: str = "") -> list[dict[str, str]]:
    resp = api.client.get(f"/detections.csv{query}")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(resp.text)))


def test_detections_land_in_the_history_and_its_csv(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    images, _ = test_images
    token = _session(api, "admin")
    assert _csv(api) == []
    assert "0 detections." in api.client.get("/detections").text
    resp = _detect(
        api, token, [("a.png", images[2]), ("b.txt", b"no"), ("c.png", images[7])]
    )
    assert resp.status_code == 200
    page = api.client.get("/detections").text
    assert "2 detections." in page  # the refused file left no row
    rows = _csv(api)
    shas = [hashlib.sha256(images[i]).hexdigest() for i in (7, 2)]
    assert [r["image_sha256"] for r in rows] == shas  # newest first
    for sha in shas:
        assert sha[:12] in page
    names = api.catalog.snapshot().names_by_index()
    for row in rows:
        assert row["model_version"] == "v0001"
        assert row["actor"] == f"key:{key_id_of(api.keys['admin'])}"
        assert row["top_class"] == names[int(row["top_class_index"])]
        assert 0 < float(row["top_confidence"]) <= 1


def test_the_csv_names_class_zero(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    """With every other category deactivated, class 0 is the only answer."""
    for c in api.catalog.list_categories():
        if c.class_index != 0:
            api.catalog.deactivate_category(c.slug)
    token = _session(api, "admin")
    _detect(api, token, [("bag.png", test_images[0][8])])
    [row] = _csv(api)
    assert (row["top_class_index"], row["top_class"]) == ("0", "T-shirt/top")
    # index 0 filters like any other; an empty choice is "any"
    assert _csv(api, "?category=0") == [row]
    assert _csv(api, "?category=1") == []
    assert _csv(api, "?category=&version=") == [row]
    assert "1 detection." in api.client.get("/detections?category=0").text


def test_history_filters_by_version_and_category(
    api: ApiEnv,
    test_images: tuple[list[bytes], np.ndarray],
    trained_state: dict[str, torch.Tensor],
) -> None:
    images, _ = test_images
    token = _session(api, "admin")
    _detect(api, token, [("one.png", images[1])])
    register_trained_version(
        api.catalog, api.store, trained_state, api.catalog.snapshot(), round=2
    )
    _detect(api, token, [("two.png", images[5]), ("three.png", images[9])])
    sha = {i: hashlib.sha256(images[i]).hexdigest() for i in (1, 5, 9)}

    assert [r["image_sha256"] for r in _csv(api, "?version=v0001")] == [sha[1]]
    assert [r["image_sha256"] for r in _csv(api, "?version=v0002")] == [sha[9], sha[5]]
    page = api.client.get("/detections?version=v0001").text
    assert "1 detection." in page and sha[1][:12] in page and sha[5][:12] not in page

    rows = _csv(api)
    by_class: dict[str, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["top_class_index"], []).append(r["image_sha256"])
    for index, expected in by_class.items():
        got = _csv(api, f"?category={index}")
        assert [r["image_sha256"] for r in got] == expected
        assert (
            f"{len(expected)} detection"
            in api.client.get(f"/detections?category={index}").text
        )
    unused = next(i for i in range(10) if str(i) not in by_class)
    assert _csv(api, f"?category={unused}") == []
    both = _csv(api, f"?version=v0002&category={rows[0]['top_class_index']}")
    assert sha[9] in [r["image_sha256"] for r in both]
    assert sha[1] not in [r["image_sha256"] for r in both]


def test_history_filters_by_day(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    from datetime import UTC, datetime, timedelta

    token = _session(api, "admin")
    _detect(api, token, [("one.png", test_images[0][3])])
    today = datetime.now(UTC).date()
    yesterday, tomorrow = today - timedelta(days=1), today + timedelta(days=1)
    assert len(_csv(api, f"?day_from={today}&day_to={today}")) == 1
    assert len(_csv(api, f"?day_from={yesterday}&day_to={yesterday}")) == 0
    assert len(_csv(api, f"?day_from={tomorrow}")) == 0
    assert len(_csv(api, f"?day_to={today}")) == 1
    assert api.client.get("/detections?day_from=yesterday").status_code == 400
