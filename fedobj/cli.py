"""The ``fedobj`` command line: the one composition root for people at a terminal.

Domain errors become one red line and exit code 2; nothing here holds logic of its
own beyond presenting what ``fedobj`` functions return.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedobj.errors import FedObjError
from fedobj.superlink import LocalSuperLink

if TYPE_CHECKING:
    from fedobj.catalog import SyncCatalog, VersionRecord
    from fedobj.registry import ArtifactStore
    from fedobj.serving import ArtifactBytes, ModelServer, ServerChoice

app = typer.Typer(
    help="fedobj: federated image classification whose categories grow.",
    no_args_is_help=True,
)
data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)
runs_app = typer.Typer(help="Runs and their outputs.", no_args_is_help=True)
link_app = typer.Typer(
    help="A local simulation SuperLink owned by fedobj.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(link_app, name="superlink")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> typer.Exit:
    """One red line on stderr and exit code 2 (the message is shown verbatim:
    a path or an SQL fragment may hold brackets that rich would read as markup)."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code=2)


@data_app.command("check")
def data_check(
    directory: Annotated[Path, typer.Argument(help="DIR/<category-slug>/<images>")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """Report usable images per category and every skipped file with why."""
    from fedobj.data.image_folder import check_image_folder

    try:
        report = check_image_folder(directory)
    except FedObjError as exc:
        raise _fail(exc) from exc
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title=f"{report.root}")
        table.add_column("category (folder)")
        table.add_column("images", justify="right")
        for slug, n in sorted(report.counts.items()):
            table.add_row(slug, str(n))
        table.add_row("[bold]total[/bold]", f"[bold]{report.total}[/bold]")
        console.print(table)
        if report.skipped:
            skipped = Table(title=f"skipped {len(report.skipped)} files")
            skipped.add_column("file")
            skipped.add_column("reason")
            for path, reason in report.skipped[:50]:
                skipped.add_row(path, reason)
            if len(report.skipped) > 50:
                skipped.add_row("…", f"{len(report.skipped) - 50} more (use --json)")
            console.print(skipped)
    if report.total == 0:
        err_console.print("[red]no usable images: this folder cannot train[/red]")
        raise typer.Exit(code=1)


def _outputs_dir(outputs: Path | None) -> Path:
    if outputs is not None:
        return outputs
    return Path(os.environ.get("FEDOBJ_OUTPUTS_DIR", "outputs")).resolve()


OutputsOpt = Annotated[Path | None, typer.Option("--outputs", help="outputs folder")]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        help="artifact store, a folder or a pyarrow.fs URI (s3://bucket/prefix"
        "?endpoint_override=host:port&scheme=http); default $FEDOBJ_REGISTRY_URI, "
        "else the outputs folder"
    ),
]


def _store(registry: str | None) -> ArtifactStore:
    """The registry this command uses (:func:`resolve_registry_root`), or one
    red line saying why it cannot be opened."""
    from fedobj.registry import ArtifactStore, resolve_registry_root

    try:
        return ArtifactStore(resolve_registry_root(registry, _outputs_dir(None)))
    except FedObjError as exc:
        raise _fail(exc) from exc


@runs_app.command("list")
def runs_list(outputs: OutputsOpt = None) -> None:
    """Runs found in the outputs folder, newest first."""
    root = _outputs_dir(outputs)
    runs = sorted(
        (p for p in root.glob("*/run.json") if p.parent.name != "latest"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    table = Table(title=str(root))
    for col in ("run", "rounds", "final central acc", "seconds"):
        table.add_column(col)
    for run_json in runs:
        summary_path = run_json.parent / "summary.json"
        s = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        acc = s.get("final_central_accuracy")
        table.add_row(
            run_json.parent.name,
            str(s.get("rounds", "running?")),
            "n/a" if acc is None else f"{acc:.4f}",
            f"{s['seconds']:.0f}" if "seconds" in s else "",
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="run id, or 'latest'")] = "latest",
    outputs: OutputsOpt = None,
) -> None:
    """One run's summary and per-round metrics."""
    import pyarrow.parquet as pq

    folder = _outputs_dir(outputs) / run
    if not (folder / "run.json").exists():
        raise _fail(FileNotFoundError(f"no run at {folder}"))
    folder = folder.resolve()
    summary = folder / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        acc = s.get("final_central_accuracy")
        console.print(
            f"run {s['run_id']}: {s['rounds']} rounds in {s['seconds']:.0f} s, "
            f"final central accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'}"
        )
    metrics = folder / "metrics.parquet"
    if metrics.exists():
        rows = [r for r in pq.read_table(metrics).to_pylist() if r["kind"] == "round"]
        table = Table()
        for col in (
            "round",
            "nodes",
            "central acc",
            "central loss",
            "fed acc",
            "lr",
            "seconds",
        ):
            table.add_column(col, justify="right")

        def f(v: float | None, p: int = 4) -> str:
            return "" if v is None else f"{v:.{p}f}"

        for r in rows:
            table.add_row(
                str(r["round"]),
                f"{r['nodes_replied']}/{r['nodes_sampled']}",
                f(r["central_accuracy"]),
                f(r["central_loss"]),
                f(r["accuracy"]),
                f(r["lr"]),
                f(r["seconds"], 1),
            )
        console.print(table)
    console.print(f"outputs: {folder}")


@app.command("run")
def run_cmd(
    app_dir: Annotated[Path, typer.Option("--app", help="the Flower app")] = Path("."),
    connection: Annotated[
        str | None,
        typer.Option(help="SuperLink connection in $FLWR_HOME/config.toml"),
    ] = None,
    federation_config: Annotated[
        str, typer.Option(help="as for flwr run, e.g. 'num-supernodes=10'")
    ] = "",
    run_config: Annotated[
        str, typer.Option(help="as for flwr run, e.g. 'num-server-rounds=3'")
    ] = "",
    outputs: OutputsOpt = None,
) -> None:
    """``flwr run --stream`` that exits by how the run ended.

    Flower's ``flwr run --stream`` returns 0 even when the run failed; this reads
    the run's status from the SuperLink, exits 1 with the run's error in one line
    when it did not complete, and otherwise shows that run's (never an older
    run's) rounds.
    """
    from fedobj.launch import launch

    args = [str(app_dir), *([connection] if connection else [])]
    if federation_config:
        args += ["--federation-config", federation_config]
    if run_config:
        args += ["--run-config", run_config]
    outcome = launch(args, os.environ, connection=connection)
    if not outcome.completed:
        err_console.print(f"[red]error:[/red] {outcome.describe()}")
        raise typer.Exit(code=1)
    folder = _outputs_dir(outputs) / str(outcome.run_id)
    if (folder / "run.json").exists():
        runs_show(str(outcome.run_id), outputs)
    else:
        console.print(
            f"{outcome.describe()}; its outputs are not under {folder.parent}"
        )


HomeOpt = Annotated[Path, typer.Option("--home", help="FLWR_HOME for the SuperLink")]
PortOpt = Annotated[int, typer.Option("--port", help="SuperLink HTTP port")]
CtlOpt = Annotated[int, typer.Option("--control-port", help="Control API port")]


def _link(home: Path, port: int, control_port: int) -> LocalSuperLink:
    extra = {"FEDOBJ_OUTPUTS_DIR": str(_outputs_dir(None))}
    return LocalSuperLink(home.resolve(), port, control_port, extra)


@link_app.command("start")
def superlink_start(
    home: HomeOpt = Path(".flwr"), port: PortOpt = 39191, control_port: CtlOpt = 39193
) -> None:
    """Start a simulation SuperLink in the background (reused if already ours)."""
    link = _link(home, port, control_port)
    try:
        pid = link.start()
    except RuntimeError as exc:
        raise _fail(exc) from exc
    console.print(f"SuperLink on 127.0.0.1:{port} (pid {pid}); log {link.log_file}")


@link_app.command("stop")
def superlink_stop(
    home: HomeOpt = Path(".flwr"), port: PortOpt = 39191, control_port: CtlOpt = 39193
) -> None:
    """Stop the SuperLink and every process it started."""
    link = _link(home, port, control_port)
    stopped = link.stop()
    console.print(
        "stopped SuperLink" if stopped else "no SuperLink of ours was running"
    )
    if link.is_healthy():
        raise _fail(
            RuntimeError(
                f"something else still serves 127.0.0.1:{port} "
                "(a SuperLink that `flwr run` "
                "started itself?); find it with `pgrep -af flower-superlink`"
            )
        )


# ---------------------------------------------------------------- catalog, versions

catalog_app = typer.Typer(
    help="Object categories (the classifier's rows).", no_args_is_help=True
)
versions_app = typer.Typer(
    help="Model versions: list, show, roll back.", no_args_is_help=True
)
app.add_typer(catalog_app, name="catalog")
app.add_typer(versions_app, name="versions")
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="catalog URL or SQLite path; default "
        "$FEDOBJ_DATABASE_URL, else <outputs>/catalog.db",
    ),
]


def _catalog(db: str | None) -> SyncCatalog:
    from fedobj.catalog import SyncCatalog

    catalog = SyncCatalog(db, default_path=_outputs_dir(None) / "catalog.db")
    try:
        catalog.migrate()
    except FedObjError as exc:
        raise _fail(exc) from exc
    return catalog


def _actor() -> str:
    """Who the audit trail names for a write from this terminal."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


@catalog_app.command("add")
def catalog_add(
    name: Annotated[str, typer.Argument(help='display name, e.g. "Ankle boot"')],
    description: Annotated[str, typer.Option(help="free text")] = "",
    db: DbOpt = None,
) -> None:
    """Add a category; running federations grow their head from the next round."""
    try:
        c = _catalog(db).add_category(name, description, actor=_actor())
    except FedObjError as exc:
        raise _fail(exc) from exc
    console.print(f"added {c.name!r} (folder {c.slug!r}) as class {c.class_index}")


@catalog_app.command("list")
def catalog_list(
    all_: Annotated[bool, typer.Option("--all", help="include inactive")] = False,
    db: DbOpt = None,
) -> None:
    """Categories with their class index, folder slug and reported samples."""
    try:
        rows = _catalog(db).list_categories(active=None if all_ else True, limit=10_000)
    except FedObjError as exc:
        raise _fail(exc) from exc
    table = Table()
    for col in ("index", "name", "folder", "active", "samples"):
        table.add_column(col)
    for c in rows:
        table.add_row(
            str(c.class_index),
            c.name,
            c.slug,
            "yes" if c.is_active else "no",
            str(c.sample_count),
        )
    console.print(table)


@catalog_app.command("deactivate")
def catalog_deactivate(
    key: Annotated[str, typer.Argument(help="name, slug, id or class index")],
    db: DbOpt = None,
) -> None:
    """Mask a category: its row stays, its index is never reused (contract 9)."""
    try:
        lookup: str | int = int(key) if key.isdigit() else key
        c = _catalog(db).deactivate_category(lookup, actor=_actor())
    except FedObjError as exc:
        raise _fail(exc) from exc
    console.print(f"deactivated {c.name!r} (class {c.class_index})")


@versions_app.command("list")
def versions_list(
    run: Annotated[str | None, typer.Option(help="only this run")] = None,
    db: DbOpt = None,
) -> None:
    """Versions, newest first; the current one is marked."""
    try:
        rows = _catalog(db).list_versions(run_id=run, limit=10_000)
    except FedObjError as exc:
        raise _fail(exc) from exc
    table = Table()
    for col in ("", "version", "run", "round", "classes", "accuracy", "created"):
        table.add_column(col)
    for v in sorted(rows, key=lambda v: v.number, reverse=True):
        table.add_row(
            "*" if v.is_current else "",
            v.name,
            v.run_id,
            str(v.round),
            str(v.class_map.num_classes),
            "" if v.accuracy is None else f"{v.accuracy:.4f}",
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@versions_app.command("show")
def versions_show(
    version: Annotated[str, typer.Argument(help="name (v0003) or id")] = "current",
    db: DbOpt = None,
) -> None:
    """One version's metrics, class map, artifacts and provenance, as JSON."""
    catalog = _catalog(db)
    try:
        v = (
            catalog.current_version()
            if version == "current"
            else (catalog.get_version(version))
        )
    except FedObjError as exc:
        raise _fail(exc) from exc
    if v is None:
        raise _fail(FileNotFoundError("no version yet"))
    print(
        json.dumps(
            {
                "id": str(v.id),
                "name": v.name,
                "current": v.is_current,
                "run_id": v.run_id,
                "round": v.round,
                "parent_id": str(v.parent_id) if v.parent_id else None,
                "metrics": v.metrics,
                "class_map": v.class_map.to_dict(),
                "checkpoint_uri": v.checkpoint_uri,
                "checkpoint_sha256": v.checkpoint_sha256,
                "size_bytes": v.size_bytes,
                "provenance": v.provenance,
                "created_at": v.created_at.isoformat(),
            },
            indent=2,
            default=str,
        )
    )


@versions_app.command("rollback")
def versions_rollback(
    version: Annotated[str, typer.Argument(help="name (v0003) or id")],
    db: DbOpt = None,
) -> None:
    """Make an older version current; a running run continues from it next round."""
    try:
        v = _catalog(db).set_current(version, actor=_actor())
    except FedObjError as exc:
        raise _fail(exc) from exc
    console.print(f"{v.name} (run {v.run_id}, round {v.round}) is now current")


@versions_app.command("prune")
def versions_prune(
    keep: Annotated[int, typer.Option(help="newest versions to keep")] = 10,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list")] = False,
    registry: RegistryOpt = None,
    db: DbOpt = None,
) -> None:
    """Delete old versions' artifacts (never the current one or a kept parent)."""
    from fedobj.pruning import prune_versions

    try:
        pruned = prune_versions(_catalog(db), _store(registry), keep, dry_run)
    except (FedObjError, ValueError) as exc:
        raise _fail(exc) from exc
    verb = "would prune" if dry_run else "pruned"
    console.print(
        f"{verb} {len(pruned)} versions: "
        + (", ".join(v.name for v in pruned) or "none")
    )


# ---------------------------------------------------------------- admin API

admin_app = typer.Typer(help="The admin API: serve it, manage its keys.")
keys_app = typer.Typer(help="API keys (stored as keyed hashes only).")
admin_app.add_typer(keys_app, name="keys")
app.add_typer(admin_app, name="admin")


def _secret_path(outputs: Path | None) -> Path:
    return _outputs_dir(outputs) / "api-secret"


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
            outputs_dir=_outputs_dir(outputs),
            database_url=db or "",
            registry_uri=registry or "",
            rate_limit_per_second=rate_limit,
            max_batch_images=max_batch,
            cors_origins=tuple(cors_origin or ()),
        )
    except FedObjError as exc:
        raise _fail(exc) from exc
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise _fail(ValueError("--ssl-certfile and --ssl-keyfile go together"))
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
        _catalog(db).create_api_key(
            key.key_id, hash_token(secret, key.token), role, name, actor=_actor()
        )
    except FedObjError as exc:
        raise _fail(exc) from exc
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
        keys = _catalog(db).list_api_keys(include_revoked=all_)
    except FedObjError as exc:
        raise _fail(exc) from exc
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
        k = _catalog(db).revoke_api_key(key_id, actor=_actor())
    except FedObjError as exc:
        raise _fail(exc) from exc
    console.print(f"revoked {k.role} key {k.key_id}")


# ---------------------------------------------------------------- edge: export, detect

# CLI name -> artifact format; "server" measures instead of exporting one format.
EXPORT_CHOICES = {"onnx": "onnx", "int8": "onnx-int8", "ort": "ort", "server": "server"}


def _model_server(db: str | None, registry: str | None) -> ModelServer:
    from fedobj.serving import ModelServer

    return ModelServer(_catalog(db).aio, _store(registry))


async def _version(server: ModelServer, version: str | None) -> VersionRecord:
    if version in (None, "current"):
        return await server.current()
    return await server.catalog.get_version(version)


@app.command("export")
def export_cmd(
    version: Annotated[str, typer.Argument(help="name (v0003), id or 'current'")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="onnx (fp32) | int8 (static QDQ ONNX) | ort (the mobile "
            "artifact: INT8 in ORT format) | server (measure fp32 vs INT8 here and "
            "record the fastest as the artifact `fedobj detect` and /detect serve)",
        ),
    ] = "onnx",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="also copy the file here")
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="timed runs per candidate (server only)")
    ] = 30,
    db: DbOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Export a version into the registry (parity-checked against torch).

    The file is stored next to the version and recorded on it (URI, SHA-256,
    parity); an export that fails parity is refused with the numbers. A version
    exported before is read back, hash-verified, not exported again.
    """
    if fmt not in EXPORT_CHOICES:
        raise _fail(
            ValueError(f"--format must be one of {', '.join(EXPORT_CHOICES)}: {fmt!r}")
        )
    server = _model_server(db, registry)

    async def run() -> tuple[VersionRecord, ArtifactBytes, ServerChoice | None]:
        v = await _version(server, version)
        if fmt == "server":
            choice = await server.choose_server_artifact(v, repeats=repeats)
            v = await server.catalog.get_version(v.id)
            return v, await server.server_artifact(v), choice
        art = await server.artifact(v, EXPORT_CHOICES[fmt])
        return await server.catalog.get_version(v.id), art, None

    try:
        v, art, choice = asyncio.run(run())
    except FedObjError as exc:
        raise _fail(exc) from exc
    entry = v.artifacts.get("server" if choice else art.fmt, {})
    table = Table(title=f"{v.name} as {fmt}", show_header=False)
    table.add_row("format", art.fmt if not choice else f"server -> {choice.fmt}")
    table.add_row("size", f"{len(art.data):,} bytes ({len(art.data) / 1e6:.2f} MB)")
    table.add_row("sha256", art.sha256)
    table.add_row("registry", str(entry.get("uri", "")))
    steps = entry.get("steps") or (
        {art.fmt: entry["parity"]} if "parity" in entry else {}
    )
    for step, p in steps.items():
        diff = p.get("max_abs_diff")
        table.add_row(
            f"parity {step}",
            f"top-1 agreement {p['top1_agreement']:.2%}, max |logit diff| "
            f"{'n/a' if diff is None else f'{diff:.3g}'} on {p['n']} images",
        )
    if entry.get("size_budget"):
        ok = len(art.data) <= int(entry["size_budget"])
        table.add_row(
            "size budget",
            f"{int(entry['size_budget']):,} bytes: {'met' if ok else 'OVER'}",
        )
    if choice:
        for cand, ms in choice.latency_ms.items():
            table.add_row(
                f"latency {cand}",
                f"batch 1 {ms['batch1']:.3f} ms, batch 8 {ms['batch8']:.3f} ms"
                + ("  <- served" if cand == choice.fmt else ""),
            )
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(art.data)
        console.print(f"wrote {out}")


@app.command("detect")
def detect_cmd(
    images: Annotated[list[Path], typer.Argument(help="image files (PNG, JPEG, …)")],
    version: Annotated[
        str | None, typer.Option(help="name or id; default the current version")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=50, help="rows per image")] = 5,
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="confidence for `detected`")
    ] = 0.7,
    as_json: Annotated[
        bool, typer.Option("--json", help="one /detect-shaped JSON line per image")
    ] = False,
    db: DbOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Classify images with a version, as the API's /detect does.

    Uses the version's server artifact: the one `fedobj export V --format server`
    measured fastest on this machine, else the fp32 ONNX file (exported on first
    use). Inactive categories are never predicted. An image that cannot be used
    (not an image, truncated, under 8x8) is reported and skipped; any other size
    or colour mode is converted and resized.
    """
    from fedobj.inference import ImageInputError
    from fedobj.serving import detect

    server = _model_server(db, registry)

    async def run() -> tuple[VersionRecord, list[tuple[Path, dict[str, Any] | str]]]:
        v = await _version(server, version)
        results: list[tuple[Path, dict[str, Any] | str]] = []
        for path in images:
            try:
                data = path.read_bytes()
                _, (result,) = await detect(
                    server, [data], top_k=top_k, threshold=threshold, version=v
                )
                results.append((path, result))
            except (OSError, ImageInputError) as exc:
                results.append((path, str(exc)))
        return v, results

    try:
        v, results = asyncio.run(run())
    except FedObjError as exc:
        raise _fail(exc) from exc
    refused = 0
    for path, result in results:
        if isinstance(result, str):
            refused += 1
            err_console.print(f"[red]refused[/red] {path}: {result}")
            continue
        if as_json:
            print(json.dumps({"image": str(path), **result}))
            continue
        verdict = "detected" if result["detected"] else f"below {threshold:g}"
        console.print(
            f"[bold]{path}[/bold]: {verdict} ({v.name}, "
            f"{result['inference_time_ms']:.2f} ms)",
            soft_wrap=True,
            highlight=False,
        )
        table = Table()
        table.add_column("#", justify="right")
        table.add_column("object")
        table.add_column("confidence", justify="right")
        table.add_column("class", justify="right")
        for rank, p in enumerate(result["predictions"], 1):
            table.add_row(
                str(rank),
                p["object_name"],
                f"{p['confidence']:.1%}",
                str(p["class_index"]),
            )
        console.print(table)
    if refused:
        raise typer.Exit(code=1)


# ---------------------------------------------------------------- deployment

deploy_app = typer.Typer(
    help="TLS and SuperNode-authentication material for a deployment.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("keys")
def deploy_keys(
    out: Annotated[Path, typer.Option("--out", help="folder for keys and certs")],
    nodes: Annotated[int, typer.Option("--nodes", help="SuperNode key pairs")] = 3,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="extra SuperLink name or IP for its certificate (repeat)"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace existing keys (re-register!)")
    ] = False,
    curve: Annotated[str, typer.Option(help="P-384 | P-256")] = "P-384",
    days: Annotated[int, typer.Option(help="SuperLink certificate validity")] = 365,
) -> None:
    """Make a CA, a SuperLink certificate and SuperNode OpenSSH key pairs.

    See conf/deploy/README.md for how each file is used.
    """
    from fedobj.deploykit import write_deploy_keys

    try:
        files = write_deploy_keys(
            out, nodes, host or (), force=force, curve=curve, days=days
        )
    except FedObjError as exc:
        raise _fail(exc) from exc
    table = Table(title=str(files.ca_cert.parent))
    table.add_column("file")
    table.add_column("use")
    table.add_row(files.ca_cert.name, "SuperNodes + flwr CLI: --root-certificates")
    table.add_row(files.ca_key.name, "signs certificates; keep offline (0600)")
    table.add_row(f"{files.server_cert.name}, {files.server_key.name}", "SuperLink TLS")
    for node in files.nodes:
        table.add_row(
            f"{node.private_key.name}, {node.public_key.name}",
            "--auth-supernode-private-key / flwr supernode register",
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
