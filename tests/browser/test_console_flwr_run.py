"""The console during a real `flwr run`: a category added on the catalog page
joins the next round's class map, and the overview — open in another tab the
whole time — shows the head growing in its round feed without a reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from fedobj.catalog import SyncCatalog
from tests.admin_api.server import serve
from tests.apps.test_admin_e2e import create_key
from tests.apps.test_catalog_e2e import finish, start_run, wait_for_round
from tests.apps.test_flwr_run_e2e import superlink  # noqa: F401  (fixture)
from tests.browser.conftest import Console, shot, sign_in

pytestmark = pytest.mark.e2e


def test_category_added_in_the_console_grows_the_head_live(
    superlink,  # noqa: F811
    tmp_path: Path,
    browser: Browser,
) -> None:
    link, _ = superlink
    db = tmp_path / "catalog.db"
    proc = start_run(
        link, db, f'num-server-rounds=6 initial-categories=6 outputs-dir="{tmp_path}"'
    )
    catalog = SyncCatalog(db)
    wait_for_round(catalog, 1, proc)
    keys = {"admin": create_key("admin", db, tmp_path)}
    with serve(tmp_path, f"sqlite:///{db}", keys, extra=("--rate-limit", "0")) as api:
        console = Console(api, catalog, tmp_path)
        watcher = browser.new_page(viewport={"width": 1280, "height": 900})
        sign_in(watcher, console)
        expect(watcher.locator("#live-label")).to_have_text("live")
        expect(watcher.locator("#round-progress")).to_contain_text("of 6")

        admin = browser.new_page()
        admin.on("dialog", lambda d: d.accept())  # "Add this category?"
        sign_in(admin, console)
        admin.goto(console.url + "/catalog")
        admin.get_by_label("Name", exact=True).fill("Bag")
        admin.get_by_role("button", name="Add category").click()
        expect(admin.get_by_role("status").filter(has_text="Added")).to_contain_text(
            "class 6"
        )

        feed = watcher.locator("#round-feed")
        expect(feed).to_contain_text("head grew to 7 classes", timeout=240_000)
        shot(watcher, "console-overview-growth")
        finish(proc)
        expect(watcher.locator("#overview-panel .badge")).to_have_text(
            "completed", timeout=5_000
        )
        grown = [v for v in catalog.list_versions() if v.class_map.num_classes == 7]
        assert grown and "bag" in {e.slug for e in grown[-1].class_map.entries}
        first = min(grown, key=lambda v: v.round)
        watcher.goto(console.url + f"/versions/{first.name}")
        expect(watcher.locator("table.confusion")).to_be_visible()  # recorded
        shot(watcher, "console-version-grown")
        watcher.close()
        admin.close()
