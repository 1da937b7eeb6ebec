"""The device's Collect page (mobile/collect.py) over HTTP: a real ``fedobj admin
serve`` holds the catalog, the collect server runs as its own process on
127.0.0.1, and every check reads what landed on disk.

The helpers here (``catalog_server``, ``collect_server``, ``photo``) are shared
with the browser test, tests/browser/test_collect_page.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fedobj.catalog import SyncCatalog
from fedobj.data.image_folder import check_image_folder
from tests.admin_api.conftest import make_keys
from tests.admin_api.server import Served, serve
from tests.conftest import ROOT, free_port

COLLECT = ROOT / "mobile" / "collect.py"
MB = 1024 * 1024
CATALOG_TTL_S = 3.0  # mobile/collect.py CATALOG_TTL_S
PRIVACY = "Photos are saved on this device only; they are never sent to the server."


@contextmanager
def catalog_server(folder: Path, *names: str) -> Iterator[Served]:
    """A real admin API over a new SQLite catalog holding ``names``."""
    url = f"sqlite://{folder / 'catalog.db'}"
    catalog = SyncCatalog(url)
    catalog.migrate()
    for name in names:
        catalog.add_category(name)
    keys = make_keys(catalog, folder / "api-secret")
    with serve(folder, url, keys) as served:
        yield served


@dataclass
class Collect:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def token(self, http: httpx.Client) -> str:
        page = http.get(f"{self.url}/").text
        found = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert found, page
        return found.group(1)

    def files(self) -> list[Path]:
        """Every file under the folder, hidden ones included."""
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file())


@contextmanager
def collect_server(
    data_dir: Path, catalog_url: str, key: str | None, *extra: str
) -> Iterator[Collect]:
    """``mobile/collect.py`` on a free 127.0.0.1 port, the key passed through
    ``FEDOBJ_DEVICE_KEY`` and torch unimportable; stopped (SIGTERM, then SIGKILL)
    when the block ends."""
    port = free_port()
    log = data_dir.parent / f"collect-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "FEDOBJ_DEVICE_KEY"}
    if key is not None:
        env["FEDOBJ_DEVICE_KEY"] = key
    # A "torch" that refuses to load: the page must run on a board without it.
    poison = data_dir.parent / f"no-torch-{port}"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text("raise ImportError('no torch')\n")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(poison), env.get("PYTHONPATH")])
    )
    cmd = [sys.executable, str(COLLECT), "--data-dir", str(data_dir)]
    cmd += ["--catalog-url", catalog_url, "--port", str(port), *extra]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = Collect(f"http://127.0.0.1:{port}", data_dir, proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"collect server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def photo(pixels: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


NOISE = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
CUT = photo(NOISE)[:2000]  # a PNG cut off inside its pixel data


def admin_writes(served: Served) -> list[str]:
    """``METHOD path`` of every request with a body the admin API counted (its
    Prometheus ``/metrics``): an uploaded photo would be one of them."""
    text = httpx.get(f"{served.base_url}/metrics", headers=served.auth("viewer")).text
    pattern = r'^fedobj_http_requests_total\{.*method="(\w+)",path="([^"]+)"'
    found = {" ".join(m) for m in re.findall(pattern, text, re.M)}
    assert "GET /api/v1/categories" in found  # the one thing the device asks for
    return sorted(r for r in found if r.split()[0] in ("POST", "PUT", "PATCH"))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    names = ("Sneaker", "Handbag", "Retired Thing", "Coat")
    with catalog_server(tmp_path_factory.mktemp("catalog"), *names) as served:
        yield served


@pytest.fixture
def collect(admin: Served, tmp_path: Path) -> Iterator[Collect]:
    with collect_server(tmp_path / "photos", admin.base_url, admin.keys["device"]) as c:
        yield c


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def post(
    http: httpx.Client,
    collect: Collect,
    slug: str,
    data: bytes,
    *,
    token: str | None = None,
    origin: str | None = None,
) -> httpx.Response:
    headers = {"X-CSRF-Token": token or collect.token(http)}
    headers["Origin"] = origin or collect.url
    files = {"image": ("photo.png", data, "image/png")}
    return http.post(
        f"{collect.url}/photos", data={"category": slug}, files=files, headers=headers
    )


# ------------------------------------------------------------------ tests


def test_the_page_lists_the_catalog_and_never_the_key(
    collect: Collect, admin: Served, http: httpx.Client
) -> None:
    resp = http.get(f"{collect.url}/")
    assert resp.status_code == 200
    page = resp.text
    for slug, name in [("sneaker", "Sneaker"), ("handbag", "Handbag")]:
        assert f'<option value="{slug}">{name}</option>' in page
    words = " ".join(re.sub(r"<[^>]+>", "", page).split())
    assert (
        f"{PRIVACY} Only the category list is fetched from {admin.base_url}." in words
    )
    assert '<html lang="en">' in page and '<label for="category">' in page
    assert "connect-src 'self'" in resp.headers["content-security-policy"]
    fragments = [
        http.get(f"{collect.url}/fragments/{f}").text for f in ("catalog", "panel")
    ]
    for text in (page, *fragments, collect.log.read_text()):
        assert admin.keys["device"] not in text
        assert admin.keys["device"].split("_")[-1] not in text  # not even the secret


def test_a_png_lands_in_its_category_folder_unchanged(
    collect: Collect, admin: Served, http: httpx.Client
) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    resp = post(http, collect, "sneaker", photo(pixels))
    assert resp.status_code == 201, resp.text
    saved = collect.data_dir / resp.json()["saved"]
    assert saved.parent == collect.data_dir / "sneaker"
    assert re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{12}\.png", saved.name)
    with Image.open(saved) as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), pixels)
    assert "Saved as sneaker/" in resp.json()["message"]
    assert collect.files() == [saved]  # no temporary file left behind
    assert admin_writes(admin) == []  # the photo never reached the admin API


def test_a_phone_jpeg_is_turned_upright_and_loses_its_metadata(
    collect: Collect, http: httpx.Client
) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    exif[0x010F] = "PhoneMaker"
    resp = post(http, collect, "handbag", photo(pixels, "JPEG", exif=exif.tobytes()))
    assert resp.status_code == 201, resp.text
    saved = collect.data_dir / resp.json()["saved"]
    with Image.open(saved) as img:
        assert saved.suffix == ".jpg" and img.size == (20, 40)  # upright
        assert not img.getexif()
        top = np.asarray(img.convert("L"))[:20]
        assert top.mean() > 200  # the white half is now on top


def _bomb() -> bytes:
    """A 10,000 x 10,000 PNG of 12 kB: more pixels than Pillow allows."""
    assert (Image.MAX_IMAGE_PIXELS or 0) < 10_000 * 10_000
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


TINY = photo(np.zeros((8, 8), np.uint8))
REFUSALS = {  # id: (slug, body, status, what the message says)
    "not-image": ("sneaker", b"%PDF-1.4 not a photo\n" * 50, 422, "Not an image"),
    "truncated": ("sneaker", CUT, 422, "damaged or truncated"),
    "oversize": ("sneaker", b"\x89PNG" + b"\0" * (10 * MB), 413, "than the 10 MB"),
    "over-body-limit": ("sneaker", b"\0" * (12 * MB), 413, "than the 10 MB limit"),
    "bomb": ("sneaker", _bomb(), 422, "decompression bomb"),
    "unknown": ("no-such-thing", TINY, 422, "Unknown category 'no-such-thing'"),
    "path": ("../escape", TINY, 422, "Choose a category"),
}


@pytest.mark.parametrize(
    ("slug", "data", "status", "says"), REFUSALS.values(), ids=REFUSALS.keys()
)
def test_refusals_are_readable_and_write_nothing(
    collect: Collect,
    http: httpx.Client,
    slug: str,
    data: bytes,
    status: int,
    says: str,
) -> None:
    resp = post(http, collect, slug, data)
    assert resp.status_code == status, resp.text
    assert says in resp.json()["detail"]
    assert collect.files() == []
    assert not (collect.data_dir.parent / "escape").exists()


def test_a_deactivated_category_is_a_stale_form(
    collect: Collect, admin: Served, http: httpx.Client
) -> None:
    token = collect.token(http)  # the page, as loaded, offered the category
    assert "retired-thing" in http.get(f"{collect.url}/fragments/catalog").text
    gone = http.delete(
        f"{admin.base_url}/api/v1/categories/retired-thing", headers=admin.auth("admin")
    )
    assert gone.status_code == 200, gone.text
    time.sleep(CATALOG_TTL_S + 0.3)  # the collect server's catalog cache expires
    resp = post(http, collect, "retired-thing", TINY, token=token)
    assert resp.status_code == 409, resp.text
    assert "The catalog changed" in resp.json()["detail"]
    assert resp.json()["catalog_changed"] is True
    assert "retired-thing" not in http.get(f"{collect.url}/fragments/catalog").text
    assert collect.files() == []


def test_forged_posts_are_403(collect: Collect, http: httpx.Client) -> None:
    image = TINY
    files = {"image": ("a.png", image, "image/png")}
    url, form = f"{collect.url}/photos", {"category": "sneaker"}
    no_token = http.post(url, data=form, files=files)
    wrong = http.post(url, data=form, files=files, headers={"X-CSRF-Token": "guess"})
    foreign = post(http, collect, "sneaker", image, origin="https://evil.example")
    for resp in (no_token, wrong):
        assert resp.status_code == 403
        assert "did not come from this page" in resp.json()["detail"]
    assert foreign.status_code == 403
    assert "another website (https://evil.example)" in foreign.json()["detail"]
    rebound = http.get(f"{collect.url}/", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403 and "csrf-token" not in rebound.text
    assert collect.files() == []


def test_counts_and_problems_are_what_data_check_reports(
    collect: Collect, http: httpx.Client
) -> None:
    sneaker = collect.data_dir / "sneaker"
    sneaker.mkdir(parents=True)
    (sneaker / "notes.txt").write_text("not a photo")
    (sneaker / "cut.png").write_bytes(CUT)
    (collect.data_dir / "old-folder").mkdir()
    (collect.data_dir / "old-folder" / "a.png").write_bytes(TINY)
    panel = http.get(f"{collect.url}/fragments/panel").text
    assert "sneaker/notes.txt</code>: not an image: suffix .txt" in panel
    assert "sneaker/cut.png</code>: unreadable" in panel
    assert "(not an active category)" in panel  # old-folder
    assert _count(panel, "sneaker") == 0 and _count(panel, "old-folder") == 1

    for i in range(2):
        image = photo(np.full((8, 8), i * 100, np.uint8))
        assert post(http, collect, "sneaker", image).status_code == 201
    panel = http.get(f"{collect.url}/fragments/panel").text
    assert (
        _count(panel, "sneaker")
        == 2
        == check_image_folder(collect.data_dir).counts["sneaker"]
    )
    assert "3 usable images" in panel


def _count(panel: str, slug: str) -> int:
    row = re.search(rf'data-slug="{slug}">.*?class="num count">(\d+)<', panel, re.S)
    assert row, panel
    return int(row.group(1))


def test_an_unreachable_catalog_leaves_the_folders_usable(
    tmp_path: Path, http: httpx.Client
) -> None:
    data_dir = tmp_path / "photos"
    (data_dir / "mug").mkdir(parents=True)
    nowhere = f"http://127.0.0.1:{free_port()}"
    with collect_server(data_dir, nowhere, "fo_0123456789_" + "x" * 43) as collect:
        page = http.get(f"{collect.url}/").text
        assert f"Could not reach the catalog at {nowhere}" in page
        assert "can still be used" in page
        assert '<option value="mug">mug</option>' in page
        assert "Traceback" not in page
        ok = post(http, collect, "mug", TINY)
        assert ok.status_code == 201, ok.text
        unknown = post(http, collect, "sneaker", TINY)
        assert unknown.status_code == 422
        assert "no such folder on this device" in unknown.json()["detail"]


def test_a_refused_key_is_said_plainly(
    admin: Served, tmp_path: Path, http: httpx.Client
) -> None:
    wrong = "fo_0123456789_" + "x" * 43
    with collect_server(tmp_path / "photos", admin.base_url, wrong) as collect:
        page = http.get(f"{collect.url}/").text
        assert "refused this device&#39;s key (HTTP 401)" in page
        assert wrong not in page


def test_categories_are_read_page_by_page(tmp_path: Path, http: httpx.Client) -> None:
    names = [f"Thing {i:03d}" for i in range(205)]
    with (
        catalog_server(tmp_path, *names) as served,
        collect_server(
            tmp_path / "photos", served.base_url, served.keys["device"]
        ) as c,
    ):
        page = http.get(f"{c.url}/").text
        assert page.count('<option value="thing-') == 205
        assert post(http, c, "thing-204", TINY).status_code == 201


def test_no_key_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDOBJ_DEVICE_KEY"}
    cmd = [sys.executable, str(COLLECT), "--data-dir", str(tmp_path)]
    done = subprocess.run(
        [*cmd, "--catalog-url", "http://127.0.0.1:9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "FEDOBJ_DEVICE_KEY" in done.stderr
