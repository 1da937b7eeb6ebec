"""API keys for the admin plane: high-entropy tokens, stored as keyed hashes.

A token is ``fo_<key_id>_<secret>``: ``key_id`` (10 hex chars) is public and
indexed, ``secret`` is 32 random bytes (base64url). The database stores only
HMAC-SHA256(server secret, token): a leaked database does not yield usable keys
without the server secret, and checking a key costs one indexed lookup and one
HMAC (microseconds). A slow KDF (bcrypt, scrypt) would add tens of milliseconds
to every request for no gain: the token is random, not a guessable password.

The server secret comes from ``$FEDOBJ_API_SECRET`` or a file (``0600``) created
beside the catalog on first use; the CLI that creates keys and the server that
checks them must read the same one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedobj.errors import FedObjError

ENV_SECRET = "FEDOBJ_API_SECRET"
SECRET_FILE = "api-secret"
_TOKEN = re.compile(r"^fo_([0-9a-f]{10})_([A-Za-z0-9_-]{43})$")


class ApiSecretError(FedObjError):
    """The server secret is missing, unreadable or too short."""


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: the token is shown once and never stored."""

    key_id: str
    token: str


def new_token() -> NewKey:
    """A fresh random key id and token (256 bits of secret)."""
    key_id = secrets.token_hex(5)
    return NewKey(key_id, f"fo_{key_id}_{secrets.token_urlsafe(32)}")


def key_id_of(token: str) -> str | None:
    """The public key id inside a well-formed token, or None."""
    match = _TOKEN.match(token.strip())
    return match.group(1) if match else None


def hash_token(secret: bytes, token: str) -> str:
    """HMAC-SHA256 of the token under the server secret, hex."""
    return hmac.new(secret, token.strip().encode(), hashlib.sha256).hexdigest()


def token_matches(secret: bytes, token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(secret, token), stored_hash)


def load_secret(secret_file: Path, *, create: bool = True) -> bytes:
    """The server secret: ``$FEDOBJ_API_SECRET``, else ``secret_file``.

    With ``create`` a missing file is made with 32 random bytes, readable by its
    owner only. Raises :class:`ApiSecretError` when there is none, or it is
    shorter than 16 bytes.
    """
    env = os.environ.get(ENV_SECRET, "")
    if env:
        secret = env.encode()
    elif secret_file.exists():
        secret = secret_file.read_bytes().strip()
    elif create:
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(32).encode()
        tmp = secret_file.with_name(f".{secret_file.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
        try:  # whoever links first wins; a racing process reads the winner's
            os.link(tmp, secret_file)
        except FileExistsError:
            secret = secret_file.read_bytes().strip()
        finally:
            tmp.unlink()
    else:
        raise ApiSecretError(
            f"no API secret: set ${ENV_SECRET} or create {secret_file} "
            "(`fedobj admin keys create` makes it)"
        )
    if len(secret) < 16:
        raise ApiSecretError(
            f"the API secret ({ENV_SECRET} or {secret_file}) must be >= 16 bytes"
        )
    return secret
