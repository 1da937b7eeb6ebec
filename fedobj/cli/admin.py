"""``fedobj admin``: serve the admin API and manage the API keys it accepts.

A key is printed once; only its hash keyed by the server secret
(``$FEDOBJ_API_SECRET``, else ``<outputs>/api-secret``; :mod:`fedobj.apikeys`) is
stored, so the catalog alone yields no usable key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedobj.cli.common import (
    DbOpt,
    OutputsOpt,
    RegistryOpt,
    actor,
    console,
    err_console,
    fail,
    open_catalog,
    outputs_dir,
)
from fedobj.errors import FedObjError

admin_app = typer.Typer(help="The admin API: serve it, manage its keys.")
keys_app = typer.Typer(help="API keys (stored as keyed hashes only).")
admin_app.add_typer(keys_app, name="keys")


def _secret_path(outputs: Path | None) -> Path:
    return outputs_dir(outputs) / "api-secret"


@admin_app.command("serve")
def admin_serve(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    db: DbOpt = None,
    registry: RegistryOpt = None,
    outputs: OutputsOpt = None,
    rate_limit: Annotated[
        int, typer.Option(help="requests/s per client address; 0 = off")
    ] = 100,
    max_batch: Annotated[int, typer.Option(help="images per /detect/batch")] = 16,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="allowed CORS origin (repeat); none: off")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM); serves HTTPS")
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="TLS private key (PEM)")
    ] = None,
) -> None:
    """Serve the admin API with uvicorn (docs at /schema/swagger).

    Keys travel as bearer tokens: off 127.0.0.1, serve HTTPS (``--ssl-certfile``
    and ``--ssl-keyfile``) or put a TLS-terminating proxy in front.
    """
    import uvicorn

    from admin_api import ApiSettings, create_app

    try:
        settings = ApiSettings(
            outputs_dir=outputs_dir(outputs),
            database_url=db or "",
            registry_uri=registry or "",
            rate_limit_per_second=rate_limit,
            max_batch_images=max_batch,
            cors_origins=tuple(cors_origin or ()),
        )
    except FedObjError as exc:
        raise fail(exc) from exc
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise fail(ValueError("--ssl-certfile and --ssl-keyfile go together"))
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
    )


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | viewer | device")],
    name: Annotated[str, typer.Option(help="what the key is for")] = "",
    db: DbOpt = None,
    outputs: OutputsOpt = None,
) -> None:
    """Create a key and print it once; only its keyed hash is stored."""
    from fedobj.apikeys import hash_token, load_secret, new_token

    try:
        secret = load_secret(_secret_path(outputs))
        key = new_token()
        open_catalog(db).create_api_key(
            key.key_id, hash_token(secret, key.token), role, name, actor=actor()
        )
    except FedObjError as exc:
        raise fail(exc) from exc
    err_console.print(
        f"created {role} key {key.key_id}; store it now, it is not shown again:"
    )
    print(key.token)


@keys_app.command("list")
def keys_list(
    all_: Annotated[bool, typer.Option("--all", help="include revoked")] = False,
    db: DbOpt = None,
) -> None:
    """Keys by id and role (never the secrets)."""
    table = Table()
    for col in ("key id", "role", "name", "created", "last used", "revoked"):
        table.add_column(col)
    try:
        keys = open_catalog(db).list_api_keys(include_revoked=all_)
    except FedObjError as exc:
        raise fail(exc) from exc
    for k in keys:
        table.add_row(
            k.key_id,
            k.role,
            k.name,
            f"{k.created_at:%Y-%m-%d %H:%M}",
            f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "-",
            f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "-",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key id `keys list` shows")],
    db: DbOpt = None,
) -> None:
    """Revoke a key; servers refuse it within a few seconds (their key cache)."""
    try:
        k = open_catalog(db).revoke_api_key(key_id, actor=actor())
    except FedObjError as exc:
        raise fail(exc) from exc
    console.print(f"revoked {k.role} key {k.key_id}")
