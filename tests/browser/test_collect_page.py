"""The Collect page in a real Chromium, used the way a person uses it: pick a
category, take a photo with the (fake) camera, upload and drop files, and watch
the counts change without a reload. Every request the page makes is recorded:
none may leave the collect server, and the admin API must see no photo.

Chromium runs with a fake capture device (tests/browser/conftest.py), which
gives a 640x480 test pattern and accepts the camera prompt.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.admin_api.server import Served
from tests.browser.conftest import shot
from tests.conftest import ROOT
from tests.mobile.test_collect import (
    Collect,
    admin_writes,
    catalog_server,
    collect_server,
    photo,
)

pytestmark = pytest.mark.browser

AXE = ROOT / "tests" / "browser" / "vendor" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("catalog")
    with catalog_server(folder, "Sneaker", "Handbag", "Ankle boot") as served:
        yield served


@pytest.fixture
def collect(admin: Served, tmp_path: Path) -> Iterator[Collect]:
    data_dir = tmp_path / "photos"
    (data_dir / "handbag").mkdir(parents=True)
    (data_dir / "handbag" / "notes.txt").write_text("a stray file")
    with collect_server(data_dir, admin.base_url, admin.keys["device"]) as c:
        yield c


def count(page: Page, slug: str) -> str:
    return page.locator(f'#panel tr[data-slug="{slug}"] .count').inner_text()


def test_camera_and_files_save_on_the_device_only(
    page: Page, collect: Collect, admin: Served, tmp_path: Path
) -> None:
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(collect.url)
    page.evaluate("window.notReloaded = true")
    expect(page.get_by_text("never sent to the server")).to_be_visible()
    expect(page.locator("#panel")).to_contain_text("handbag/notes.txt")

    # Keyboard only: choose a category, then Tab to the camera and start it.
    page.get_by_label("Category", exact=True).select_option(label="Sneaker")
    page.get_by_label("Category", exact=True).focus()
    page.keyboard.press("Tab")  # Reload list
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Start camera")).to_be_focused()
    page.keyboard.press("Enter")
    shoot = page.get_by_role("button", name="Take photo")
    expect(shoot).to_be_enabled()
    expect(page.locator("#camera-status")).to_contain_text("Camera on")
    shoot.click()
    saved = page.locator("#results li.ok").first
    expect(saved).to_contain_text("Saved as sneaker/")
    expect(saved).to_contain_text("(640×480)")
    expect(page.locator('#panel tr[data-slug="sneaker"] .count')).to_have_text("1")
    [frame] = (collect.data_dir / "sneaker").iterdir()
    with Image.open(frame) as img:
        assert img.size == (640, 480)
        assert np.asarray(img.convert("L")).std() > 10  # a test pattern, not black

    # A file through the file input, into another category.
    pixels = np.random.default_rng(3).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    upload = tmp_path / "bag.png"
    upload.write_bytes(photo(pixels))
    page.get_by_label("Category", exact=True).select_option("handbag")
    page.get_by_label("Choose image files").set_input_files(upload)
    expect(page.locator("#results li.ok").first).to_contain_text("bag.png")
    expect(page.locator('#panel tr[data-slug="handbag"] .count')).to_have_text("1")
    [bag] = (collect.data_dir / "handbag").glob("*.png")
    with Image.open(bag) as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), pixels)

    # A file dropped on the drop zone, and a refusal shown next to its name.
    _drop(page, "dropped.png", photo(pixels[:, ::-1].copy()))
    expect(page.locator("#results li.ok").first).to_contain_text("dropped.png")
    expect(page.locator('#panel tr[data-slug="handbag"] .count')).to_have_text("2")
    page.get_by_label("Choose image files").set_input_files(
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}
    )
    refused = page.locator("#results li.err").first
    expect(refused).to_contain_text("notes.png")
    expect(refused).to_contain_text("Not an image")
    assert len(list((collect.data_dir / "handbag").glob("*.png"))) == 2

    assert page.evaluate("window.notReloaded") is True
    _no_serious_axe_violations(page)
    shot(page, "collect")  # outputs/screenshots/collect.png

    origin = urlsplit(collect.url)
    assert requests and all(
        urlsplit(u)[:2] == origin[:2] for u in requests if not u.startswith("blob:")
    ), requests
    assert admin_writes(admin) == []


def _drop(page: Page, name: str, data: bytes) -> None:
    """Drop a file on ``#drop`` as a drag from the desktop would."""
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            const zone = document.getElementById("drop");
            const drop = new DragEvent("drop", { dataTransfer: dt, bubbles: true });
            zone.dispatchEvent(drop);
        }""",
        [name, base64.b64encode(data).decode()],
    )


def _no_serious_axe_violations(page: Page) -> None:
    """axe-core (vendored) on the page as it stands: no serious or critical
    findings (contrast, labels, landmarks, names)."""
    page.evaluate(AXE.read_text())  # evaluated through CDP: the page's CSP allows it
    found = page.evaluate("axe.run().then(r => r.violations)")
    serious = [v for v in found if v["impact"] in ("serious", "critical")]
    assert not serious, json.dumps(serious, indent=1)[:4000]


@pytest.mark.parametrize(
    ("init", "says"),
    [
        ("delete Navigator.prototype.mediaDevices", "No camera is available"),
        (
            "navigator.mediaDevices.getUserMedia = () => Promise.reject("
            "new DOMException('denied', 'NotAllowedError'))",
            "Camera access was refused",
        ),
    ],
    ids=["no-camera", "refused"],
)
def test_without_a_camera_the_files_remain(
    page: Page, collect: Collect, init: str, says: str, tmp_path: Path
) -> None:
    page.add_init_script(init)
    page.goto(collect.url)
    start = page.get_by_role("button", name="Start camera")
    if start.is_enabled():
        start.click()
    expect(page.locator("#camera-status")).to_contain_text(says)
    expect(page.locator("#camera-status")).to_contain_text("Choose or drop image files")
    expect(start).to_be_disabled()
    image = tmp_path / "shoe.png"
    image.write_bytes(photo(np.full((12, 12), 90, dtype=np.uint8)))
    page.get_by_label("Category", exact=True).select_option("sneaker")
    page.get_by_label("Choose image files").set_input_files(image)
    expect(page.locator('#panel tr[data-slug="sneaker"] .count')).to_have_text("1")


def test_a_stale_form_reloads_the_list(page: Page, tmp_path: Path) -> None:
    with (
        catalog_server(tmp_path, "Sneaker", "Ankle boot") as admin,
        collect_server(
            tmp_path / "photos", admin.base_url, admin.keys["device"]
        ) as collect,
    ):
        page.goto(collect.url)
        page.get_by_label("Category", exact=True).select_option(label="Ankle boot")
        gone = httpx.delete(
            f"{admin.base_url}/api/v1/categories/ankle-boot",
            headers=admin.auth("admin"),
            timeout=30,
        )
        assert gone.status_code == 200, gone.text
        page.wait_for_timeout(3300)  # the collect server's catalog cache expires
        image = tmp_path / "boot.png"
        image.write_bytes(photo(np.full((12, 12), 30, dtype=np.uint8)))
        page.get_by_label("Choose image files").set_input_files(image)
        refused = page.locator("#results li.err").first
        expect(refused).to_contain_text("The catalog changed")
        expect(page.locator('#category option[value="ankle-boot"]')).to_have_count(0)
        expect(page.locator('#category option[value="sneaker"]')).to_have_count(1)
        assert not (collect.data_dir / "ankle-boot").exists()
