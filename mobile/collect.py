#!/usr/bin/env python3
"""The device's Collect page: label photos into the SuperNode's image folder.

    python mobile/collect.py --data-dir /data/photos \\
        --catalog-url https://admin.example.org [--key KEY] [--host 127.0.0.1] \\
        [--port 8765]

A person picks a category from the federation's catalog, takes a photo with the
camera or uploads files, and each image lands in ``DATA_DIR/<slug>/`` where the
ClientApp reads it. Only the category list is fetched, by this process, with the
device key (``--key`` or ``$FEDOBJ_DEVICE_KEY``, which keeps it out of the shell
history and ``ps``); the key never reaches the browser and photos never leave
the device. Counts and problems are what ``fedobj data check DATA_DIR`` reports.

Another website open in the same browser can send requests to 127.0.0.1, so
every request must name this server in ``Host`` (which also defeats DNS
rebinding) and every POST must carry this process's random token and, when the
browser sends one, this page's ``Origin``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

try:
    import fedobj  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State, UploadFile
from litestar.di import Provide
from litestar.enums import RequestEncodingType
from litestar.exceptions import (
    HTTPException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Body
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.template.config import TemplateConfig
from PIL import Image, ImageOps, UnidentifiedImageError

from fedobj.data.image_folder import FolderReport, check_image_folder
from fedobj.errors import FedObjError

log = logging.getLogger("collect")
MB = 1024 * 1024
TEMPLATES = Path(__file__).resolve().with_name("templates")
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")  # fedobj.data.categories.slugify
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # what `fedobj data check` counts
CATALOG_PAGE = 200  # the admin API's largest page
CATALOG_TTL_S = 3.0  # a stale form is caught within this long of a change
INCOMING = ".incoming"  # hidden: check_image_folder skips it; same filesystem
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
Conn = ASGIConnection[Any, Any, Any, Any]


class Refused(Exception):
    """An upload this page must explain to a person; nothing was written."""

    def __init__(
        self, message: str, status: int = 422, *, catalog_changed: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.catalog_changed = catalog_changed


@dataclass(frozen=True)
class Category:
    slug: str
    name: str


@dataclass(frozen=True)
class CatalogView:
    """The categories a photo may go to now; ``error`` says why the catalog could
    not be read, and then the categories are the folders already in DATA_DIR."""

    categories: tuple[Category, ...]
    error: str | None = None

    @property
    def slugs(self) -> frozenset[str]:
        return frozenset(c.slug for c in self.categories)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect
    points; the device key goes to the configured server only."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class CatalogClient:
    """Active categories from the admin API, cached for ``ttl_s`` seconds."""

    def __init__(self, url: str, key: str, ttl_s: float = CATALOG_TTL_S) -> None:
        self.url = url.rstrip("/")
        netloc = urllib.parse.urlsplit(self.url).netloc  # shown without user:password
        self.display_url = self.url.replace(netloc, netloc.rpartition("@")[2], 1)
        self._key = key
        self.ttl_s = ttl_s
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Category] | str] | None = None
        self.seen: set[str] = set()  # every slug the catalog ever listed

    def _page(self, offset: int) -> dict[str, Any]:
        query = urllib.parse.urlencode(
            {"active": "true", "limit": CATALOG_PAGE, "offset": offset}
        )
        request = urllib.request.Request(
            f"{self.url}/api/v1/categories?{query}",
            headers={"Authorization": f"Bearer {self._key}"},
        )
        with self._opener.open(request, timeout=5) as resp:
            body: dict[str, Any] = json.load(resp)
        return body

    def _fetch(self) -> list[Category] | str:
        """Every active category, or a message saying why there is none."""
        where = self.display_url
        found: list[Category] = []
        try:
            for _ in range(1000):  # a bound, should `total` never be reached
                body = self._page(len(found))
                items = body["items"]
                found += [Category(i["slug"], i["name"]) for i in items]
                if not items or len(found) >= int(body["total"]):
                    break
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return (
                    f"The catalog at {where} refused this device's key (HTTP 401). "
                    "Check --key or FEDOBJ_DEVICE_KEY."
                )
            if exc.code == 403:
                return f"The catalog at {where} does not let this key read categories."
            return f"The catalog at {where} answered HTTP {exc.code}."
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            reason = getattr(reason, "strerror", None) or reason  # no "[Errno 111]"
            return f"Could not reach the catalog at {where} ({reason})."
        except (ValueError, KeyError, TypeError):
            return f"The catalog at {where} sent an answer this page cannot read."
        bad = [c.slug for c in found if not SLUG.match(c.slug)]
        if bad:
            return f"The catalog at {where} listed an unusable slug: {bad[0]!r}."
        return sorted(found, key=lambda c: c.name.casefold())

    def view(self, data_dir: Path, *, fresh: bool = False) -> CatalogView:
        """The catalog's active categories, or the folders when it cannot be read."""
        with self._lock:
            now = time.monotonic()
            if fresh or self._cached is None or now - self._cached[0] > self.ttl_s:
                self._cached = (now, self._fetch())
            result = self._cached[1]
        if isinstance(result, str):
            folders = sorted(
                p.name for p in data_dir.iterdir() if p.is_dir() and SLUG.match(p.name)
            )
            return CatalogView(tuple(Category(s, s) for s in folders), result)
        self.seen.update(c.slug for c in result)
        return CatalogView(tuple(result))


def _decode(data: bytes) -> Image.Image:
    """The fully decoded image, or :class:`Refused` saying what is wrong with it."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > (Image.MAX_IMAGE_PIXELS or sys.maxsize):
                raise Image.DecompressionBombError("too many pixels")
            img.load()  # truncated pixel data shows only here
            fmt = img.format
            upright = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise Refused(
            "Refused: too many pixels for its file size (a decompression bomb); "
            f"the limit is {Image.MAX_IMAGE_PIXELS or 0:,} pixels."
        ) from None
    except UnidentifiedImageError:
        raise Refused("Not an image: expected a JPEG, PNG, WebP or BMP file.") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Refused(f"The image is damaged or truncated ({exc}).") from None
    upright.format = fmt
    return upright


def encode(img: Image.Image) -> tuple[bytes, str]:
    """Re-encode what Pillow decoded: JPEG stays JPEG (quality 95), the rest PNG.

    Re-encoding rather than keeping the uploaded bytes because: the EXIF rotation
    is applied (the training loader ignores EXIF, so a portrait phone photo would
    otherwise train sideways); EXIF metadata such as the GPS position and the
    camera's serial number is dropped; bytes appended after the image are not
    kept; every saved file has a suffix ``fedobj data check`` counts. The cost, a
    second JPEG generation at quality 95, is invisible at training resolution.
    """
    out = io.BytesIO()
    if img.format == "JPEG":
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        img.save(out, format="JPEG", quality=95)
        return out.getvalue(), ".jpg"
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    img.save(out, format="PNG")
    return out.getvalue(), ".png"


def write_atomically(root: Path, slug: str, payload: bytes, suffix: str) -> Path:
    """Write ``root/<slug>/<UTC time>-<sha256[:12]><suffix>`` via a temp file and a
    rename, so a scan or a training round never sees a half-written image."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    digest = hashlib.sha256(payload).hexdigest()[:12]
    target = root / slug / f"{stamp}-{digest}{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    (root / INCOMING).mkdir(exist_ok=True)
    tmp = root / INCOMING / f"{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not outlive the bytes
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


@dataclass
class Collector:
    """One process's settings, catalog client and anti-forgery token."""

    data_dir: Path
    catalog: CatalogClient
    max_bytes: int = 10 * MB
    allowed_hosts: frozenset[str] | None = None  # None: any (a wildcard bind)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def check_category(self, slug: str) -> None:
        """Refuse a slug that is not an active category (or, with the catalog
        unreachable, an existing folder); re-read the catalog before refusing."""
        if not SLUG.match(slug):
            raise Refused("Choose a category from the list first.")
        view = self.catalog.view(self.data_dir)
        if slug not in view.slugs:
            view = self.catalog.view(self.data_dir, fresh=True)
        if slug in view.slugs:
            return
        if slug in self.catalog.seen:
            raise Refused(
                f"The catalog changed: {slug!r} is no longer an active category. "
                "The list was reloaded; choose a category again.",
                409,
                catalog_changed=True,
            )
        where = "folder on this device" if view.error else "category in the catalog"
        raise Refused(f"Unknown category {slug!r}: no such {where}.")

    def save(self, slug: str, data: bytes) -> tuple[Path, Image.Image]:
        """Validate, re-encode and store one image; :class:`Refused` otherwise."""
        if len(data) > self.max_bytes:
            raise Refused(self.too_large(), 413)
        if not data:
            raise Refused("The file is empty.")
        self.check_category(slug)
        img = _decode(data)
        payload, suffix = encode(img)
        return write_atomically(self.data_dir, slug, payload, suffix), img

    def too_large(self) -> str:
        return f"The file is larger than the {self.max_bytes // MB} MB limit."

    def catalog_context(self, fresh: bool = False) -> dict[str, Any]:
        """What the category picker shows."""
        view = self.catalog.view(self.data_dir, fresh=fresh)
        return {"view": view, "data_dir": str(self.data_dir)}

    def panel_context(self) -> dict[str, Any]:
        """Counts per category and the files training would skip, as ``fedobj data
        check`` finds them (a full scan: fine for the hundreds of photos a person
        labels, slow for tens of thousands)."""
        view = self.catalog.view(self.data_dir)
        try:
            report, error = check_image_folder(self.data_dir), None
        except FedObjError as exc:  # the folder was removed under us
            report, error = FolderReport(self.data_dir), str(exc)
        counts = report.counts
        rows = [(c.name, c.slug, counts[c.slug], True) for c in view.categories]
        rows += [
            (s, s, n, False) for s, n in sorted(counts.items()) if s not in view.slugs
        ]
        return {
            "rows": rows,
            "total": report.total,
            "skipped": report.skipped,
            "scan_error": error,
            "data_dir": str(self.data_dir),
        }


async def host_guard(conn: Conn, _: BaseRouteHandler) -> None:
    """Only requests addressed to this server by name (no DNS rebinding)."""
    allowed: frozenset[str] | None = conn.app.state.collector.allowed_hosts
    if allowed is not None and conn.headers.get("host", "") not in allowed:
        raise PermissionDeniedException(
            "Refused: this page answers only at the address it printed on start."
        )


async def csrf_guard(conn: Conn, _: BaseRouteHandler) -> None:
    """A POST must come from this page: its token, and its origin if one is sent."""
    collector: Collector = conn.app.state.collector
    sent = conn.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(sent.encode(), collector.token.encode()):
        raise PermissionDeniedException(
            "Refused: the request did not come from this page (missing or wrong "
            "X-CSRF-Token). Reload the page and try again."
        )
    origin = conn.headers.get("origin")
    if origin is not None and origin != f"{conn.url.scheme}://{conn.headers['host']}":
        raise PermissionDeniedException(
            f"Refused: the request came from another website ({origin})."
        )


@dataclass
class PhotoForm:
    category: str
    image: UploadFile


@get("/", sync_to_thread=True)
def page(collector: Collector) -> Template:
    """The page; its policy lets it talk to this server only (``connect-src``)."""
    nonce = secrets.token_urlsafe(16)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    return Template(
        "collect.html",
        context={
            **collector.catalog_context(),
            **collector.panel_context(),
            "catalog_url": collector.catalog.display_url,
            "token": collector.token,
            "max_bytes": collector.max_bytes,
            "max_mb": collector.max_bytes // MB,
            "nonce": nonce,
        },
        headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"},
    )


@get("/fragments/catalog", sync_to_thread=True)
def catalog_fragment(collector: Collector, fresh: bool = False) -> Template:
    """The category picker, re-read from the catalog (after it changed)."""
    return Template("collect_catalog.html", context=collector.catalog_context(fresh))


@get("/fragments/panel", sync_to_thread=True)
def panel_fragment(collector: Collector) -> Template:
    """Counts and problems, refreshed after each save without a page reload."""
    return Template("collect_panel.html", context=collector.panel_context())


@get("/health", media_type=MediaType.TEXT)
async def health() -> str:
    return "ok"


@post("/photos", guards=[csrf_guard], sync_to_thread=True)
def save_photo(
    collector: Collector,
    data: Annotated[PhotoForm, Body(media_type=RequestEncodingType.MULTI_PART)],
) -> dict[str, str]:
    """Save one image under ``DATA_DIR/<category>/``; JSON for the page to show."""
    raw = data.image.file.read(collector.max_bytes + 1)
    path, img = collector.save(data.category.strip(), raw)
    rel = path.relative_to(collector.data_dir).as_posix()
    return {"saved": rel, "message": f"Saved as {rel} ({img.width}×{img.height})."}


def problem(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Every refusal as ``{"detail": ...}``, the sentence the page shows next to the
    file; a bug is logged here with its traceback and never shown."""
    changed = False
    if isinstance(exc, Refused):
        status, detail, changed = exc.status, exc.message, exc.catalog_changed
    elif isinstance(exc, ValidationException):
        status, detail = 400, "The upload needs a category and one image file."
    elif isinstance(exc, HTTPException) and exc.status_code == 413:
        status, detail = 413, request.app.state.collector.too_large()
    else:
        log.error("unexpected error", exc_info=exc)
        status, detail = 500, "The collect server failed; its log says why."
    return Response({"detail": detail, "catalog_changed": changed}, status_code=status)


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """``Host`` values this server answers to; None for a wildcard bind."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = LOOPBACK if host in LOOPBACK else frozenset({host})
    return frozenset(f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names)


def create_app(collector: Collector) -> Litestar:
    """The Collect app; the body limit leaves room for the multipart framing."""
    return Litestar(
        route_handlers=[page, catalog_fragment, panel_fragment, health, save_photo],
        dependencies={"collector": Provide(lambda: collector, sync_to_thread=False)},
        guards=[host_guard],
        exception_handlers={
            k: problem for k in (Refused, ValidationException, 413, 500)
        },
        template_config=TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine),
        request_max_body_size=collector.max_bytes + MB,
        state=State({"collector": collector}),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="the SuperNode's image folder")
    p.add_argument("--catalog-url", required=True, help="the admin API's base URL")
    p.add_argument("--key", help="device API key (default: $FEDOBJ_DEVICE_KEY)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    args.key = (args.key or os.environ.get("FEDOBJ_DEVICE_KEY", "")).strip()
    if not args.key:
        p.error("no device key: pass --key or set FEDOBJ_DEVICE_KEY")
    if urllib.parse.urlsplit(args.catalog_url).scheme not in ("http", "https"):
        p.error("--catalog-url must start with http:// or https://")
    return args


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    data_dir = Path(args.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    collector = Collector(
        data_dir,
        CatalogClient(args.catalog_url, args.key),
        allowed_hosts=allowed_hosts(args.host, args.port),
    )
    app = create_app(collector)
    if args.host not in LOOPBACK:
        print(
            "warning: anyone who can reach this address can save photos here, and "
            "browsers open the camera only on localhost or over HTTPS",
            file=sys.stderr,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"Collect page: http://{shown}:{args.port}/ (photos saved under {data_dir}; "
        f"categories from {collector.catalog.display_url})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
