"""``fedobj export`` and ``fedobj detect``: a version as a servable file, and
images classified with it exactly as the API's /detect does.

Both go through :class:`fedobj.serving.ModelServer`, the code the API serves
with, so what a terminal shows is what a device or a request would get.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedobj.cli.common import (
    DbOpt,
    RegistryOpt,
    console,
    err_console,
    fail,
    open_catalog,
    open_store,
)
from fedobj.errors import FedObjError

if TYPE_CHECKING:
    from fedobj.catalog import VersionRecord
    from fedobj.serving import ArtifactBytes, ModelServer, ServerChoice

# CLI name -> artifact format; "server" measures instead of exporting one format.
EXPORT_CHOICES = {"onnx": "onnx", "int8": "onnx-int8", "ort": "ort", "server": "server"}


def _model_server(db: str | None, registry: str | None) -> ModelServer:
    from fedobj.serving import ModelServer

    return ModelServer(open_catalog(db).aio, open_store(registry))


async def _version(server: ModelServer, version: str | None) -> VersionRecord:
    if version in (None, "current"):
        return await server.current()
    return await server.catalog.get_version(version)


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
        raise fail(
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
        raise fail(exc) from exc
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
        raise fail(exc) from exc
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
