"""The console's session cookie and CSRF token (``admin_api.console.session``)."""

from __future__ import annotations

import base64
import json

import pytest

from admin_api.console.session import SessionCodec, same_origin

SECRET = b"a server secret of the usual kind"
T0 = 1_900_000_000.0  # a fixed "now": expiry is tested without waiting


def _payload(cookie: str) -> dict[str, object]:
    body = cookie.split(".")[0]
    data: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    )
    return data


def _encode(data: dict[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_cookie_verifies_to_the_session_it_was_issued_for() -> None:
    codec = SessionCodec(SECRET, ttl_s=3600)
    cookie, session = codec.issue("abc123", now=T0)
    assert (session.key_id, session.expires) == ("abc123", T0 + 3600)
    assert codec.verify(cookie, now=T0 + 1) == session
    # the cookie carries the key's public id and the expiry, nothing secret
    assert _payload(cookie) == {"k": "abc123", "s": session.sid, "e": int(T0 + 3600)}
    assert SECRET.decode() not in cookie


def test_each_sign_in_is_a_new_session() -> None:
    codec = SessionCodec(SECRET)
    first, a = codec.issue("abc123", now=T0)
    second, b = codec.issue("abc123", now=T0)
    assert first != second and a.sid != b.sid


def test_a_tampered_payload_is_refused() -> None:
    codec = SessionCodec(SECRET)
    cookie, session = codec.issue("viewer1", now=T0)
    _, signature = cookie.split(".")
    # another key id (an admin's, say) under the viewer's signature
    forged = {"k": "admin1", "s": session.sid, "e": int(session.expires)}
    assert codec.verify(f"{_encode(forged)}.{signature}", now=T0) is None
    # a later expiry under the old signature
    later = {"k": "viewer1", "s": session.sid, "e": int(session.expires) + 10**6}
    assert codec.verify(f"{_encode(later)}.{signature}", now=T0) is None


def test_a_tampered_signature_is_refused() -> None:
    codec = SessionCodec(SECRET)
    cookie, _ = codec.issue("abc123", now=T0)
    payload, signature = cookie.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert codec.verify(f"{payload}.{flipped}", now=T0) is None
    assert codec.verify(f"{payload}.", now=T0) is None
    assert codec.verify(f"{payload}.{signature[:-2]}", now=T0) is None


@pytest.mark.parametrize("cookie", [None, "", "no-dot-at-all", "a.b.c", ".", "%%%.###"])
def test_malformed_cookies_are_refused(cookie: str | None) -> None:
    assert SessionCodec(SECRET).verify(cookie, now=T0) is None


def test_an_expired_cookie_is_refused() -> None:
    codec = SessionCodec(SECRET, ttl_s=60)
    cookie, _ = codec.issue("abc123", now=T0)
    assert codec.verify(cookie, now=T0 + 59) is not None
    assert codec.verify(cookie, now=T0 + 60) is None  # expiry is exclusive
    assert codec.verify(cookie, now=T0 + 3600) is None


def test_a_cookie_signed_with_another_secret_is_refused() -> None:
    ours, theirs = SessionCodec(SECRET), SessionCodec(b"another server's secret")
    cookie, _ = theirs.issue("abc123", now=T0)
    assert theirs.verify(cookie, now=T0) is not None
    assert ours.verify(cookie, now=T0) is None


def test_csrf_token_is_one_per_session_and_checked() -> None:
    codec = SessionCodec(SECRET)
    _, a = codec.issue("abc123", now=T0)
    _, b = codec.issue("abc123", now=T0)
    token_a, token_b = codec.csrf_token(a), codec.csrf_token(b)
    assert token_a != token_b
    assert codec.csrf_token(a) == token_a  # stable for the session
    assert codec.csrf_ok(a, token_a) and codec.csrf_ok(b, token_b)
    assert not codec.csrf_ok(a, token_b)
    assert not codec.csrf_ok(a, None)
    assert not codec.csrf_ok(a, "")
    assert not codec.csrf_ok(a, token_a[:-1])
    # the same session id under another server secret gives another token
    assert not SessionCodec(b"another server's secret").csrf_ok(a, token_a)


def test_a_csrf_token_is_not_a_session_signature() -> None:
    codec = SessionCodec(SECRET)
    cookie, session = codec.issue("abc123", now=T0)
    payload, signature = cookie.split(".")
    token = codec.csrf_token(session)
    assert token != signature
    assert codec.verify(f"{payload}.{token}", now=T0) is None


@pytest.mark.parametrize(
    "origin, host, same",
    [
        (None, "console.example", True),  # no Origin: the token still guards
        ("", "console.example", True),
        ("https://console.example", "console.example", True),
        ("http://Console.Example", "console.example", True),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("https://evil.example", "console.example", False),
        ("https://console.example.evil.example", "console.example", False),
        ("http://127.0.0.1:9999", "127.0.0.1:8000", False),
        ("null", "console.example", False),  # a sandboxed frame or a file
        ("https://console.example", None, False),
        ("https://console.example", "", False),
    ],
)
def test_same_origin(origin: str | None, host: str | None, same: bool) -> None:
    assert same_origin(origin, host) is same
