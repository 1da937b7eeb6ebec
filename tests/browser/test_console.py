"""The console as its users meet it: a real Chromium, a real server process,
clicks and keys. One test per page's main action, the roles, CSRF, and axe-core
on every page (no serious or critical violation)."""

from __future__ import annotations

import re
import time

import numpy as np
from playwright.sync_api import Page, expect

from fedobj.catalog import NotFoundError
from tests.admin_api.conftest import png_bytes
from tests.browser.conftest import Console, axe_violations, csrf_of, shot, sign_in

PAGES = [
    ("/", "Overview"),
    ("/catalog", "Catalog"),
    ("/versions", "Model versions"),
    ("/versions/v0002", "Version v0002"),
    ("/runs", "Runs"),
    ("/runs/test-run", "Run test-run"),
    ("/nodes", "Nodes"),
    ("/detect", "Detect"),
    ("/detections", "Detection history"),
    ("/audit", "Audit log"),
]


def test_every_page_renders_for_an_admin_with_no_serious_axe_violation(
    page: Page, console: Console
) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, console)
    for path, heading in PAGES:
        page.goto(console.url + path)
        expect(page.get_by_role("heading", level=1)).to_contain_text(heading)
        shot(page, "console" + (path.replace("/", "-") if path != "/" else "-overview"))
        assert axe_violations(page) == [], path
    page.goto(console.url + "/login")
    assert axe_violations(page) == []
    assert errors == []


def test_sign_in_refuses_a_bad_key_and_sign_out_ends_the_session(
    page: Page, console: Console
) -> None:
    page.goto(console.url + "/catalog")
    expect(page).to_have_url(re.compile(r"/login\?next=/catalog"))
    page.get_by_label("API key").fill("fo_0123456789_" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#key-error")).to_contain_text("not valid")
    page.get_by_label("API key").fill(console.key("viewer"))
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/catalog$"))  # back where it was going
    cookie = next(c for c in page.context.cookies() if c["name"] == "fedobj_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You are signed out.")).to_be_visible()
    page.goto(console.url + "/catalog")
    expect(page).to_have_url(re.compile(r"/login"))


def test_add_category_shows_in_the_list_and_refusals_next_to_the_field(
    page: Page, console: Console
) -> None:
    sign_in(page, console)
    page.on("dialog", lambda d: d.accept())  # "Add this category?"
    page.goto(console.url + "/catalog")
    name = f"Umbrella {time.time_ns() % 10**6}"
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Add category").click()
    expect(page.get_by_role("status").filter(has_text="Added")).to_contain_text(name)
    expect(page.locator("#category-table")).to_contain_text(name)  # no reload
    assert console.catalog.get_category(name).is_active
    page.get_by_label("Name", exact=True).fill(name.upper())  # names ignore case
    page.get_by_role("button", name="Add category").click()
    expect(page.locator("#new-name-error")).to_contain_text("already exists")
    page.get_by_label("Name", exact=True).fill("Bad\tname")
    page.get_by_role("button", name="Add category").click()
    expect(page.locator("#new-name-error")).to_be_visible()
    shot(page, "console-catalog-refusal")
    page.get_by_label("Search").fill(name[:8])
    expect(page.locator("#category-table tbody tr")).to_have_count(1)


def test_deactivate_and_delete_ask_first(page: Page, console: Console) -> None:
    made = console.catalog.add_category(f"Scarf {time.time_ns() % 10**6}")
    sign_in(page, console)
    page.goto(console.url + f"/catalog?q={made.slug}")
    page.once("dialog", lambda d: d.dismiss())
    page.get_by_role("button", name=f"Deactivate {made.name}").click()
    assert console.catalog.get_category(made.slug).is_active  # dismissed: nothing
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name=f"Deactivate {made.name}").click()
    expect(page.locator(f'tr[data-slug="{made.slug}"]')).to_contain_text("inactive")
    page.goto(console.url + f"/catalog?q={made.slug}")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name=f"Delete {made.name}").click()
    expect(page.locator("#category-table")).not_to_contain_text(made.slug)
    try:
        console.catalog.get_category(made.slug)
        raise AssertionError("the category is still there")
    except NotFoundError:
        pass


def test_rollback_is_confirmed_and_makes_the_version_current(
    page: Page, console: Console
) -> None:
    sign_in(page, console)
    before = console.catalog.current_version()
    assert before is not None
    older = "v0001" if before.name != "v0001" else "v0002"
    page.goto(console.url + f"/versions/{older}")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name=f"Roll back to {older}").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("current")
    current = console.catalog.current_version()
    assert current is not None and current.name == older
    console.catalog.set_current(before.name)


def _fixture_png() -> bytes:
    from fedobj.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist("test")
    return png_bytes(data.images[int(np.flatnonzero(data.labels == 1)[0]), 0])


def test_detect_an_uploaded_png_and_a_bad_file(page: Page, console: Console) -> None:
    sign_in(page, console, "device")
    expect(page).to_have_url(re.compile(r"/detect$"))  # a device's home
    page.get_by_label("Images").set_input_files(
        [
            {"name": "trouser.png", "mimeType": "image/png", "buffer": _fixture_png()},
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"},
        ]
    )
    page.get_by_role("button", name="Detect", exact=True).click()
    results = page.locator("#results")
    # the first detection of a version exports it to ONNX (seconds)
    expect(results.locator("article")).to_have_count(2, timeout=90_000)
    expect(results.locator("article").nth(0)).to_contain_text("Trouser")
    expect(results.locator("article").nth(0).locator("meter")).to_have_count(3)
    expect(results.locator("article").nth(1)).to_contain_text("Refused")
    shot(page, "console-detect")


def test_detect_a_camera_frame(page: Page, console: Console) -> None:
    before = console.catalog.count_detections()
    sign_in(page, console, "device")
    page.get_by_role("button", name="Start camera").click()
    expect(page.get_by_text("Camera on")).to_be_visible()
    page.get_by_role("button", name="Capture and detect").click()
    expect(page.locator("#results article")).to_contain_text("camera-", timeout=90_000)
    expect(page.locator("#results article meter").first).to_be_visible()
    assert console.catalog.count_detections() == before + 1


def test_history_filters_and_exports_csv(page: Page, console: Console) -> None:
    sign_in(page, console)
    page.goto(console.url + "/detections")
    total = console.catalog.count_detections()
    expect(page.get_by_text(f"{total} detection")).to_be_visible()
    page.get_by_label("Version").select_option("v0002")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"version=v0002"))
    href = page.get_by_role("link", name="Export CSV").get_attribute("href")
    assert href is not None and "version=v0002" in href
    text = page.request.get(console.url + href).text()  # the session's cookie
    rows = text.splitlines()
    assert rows[0].startswith("at,actor,image_sha256")
    shown = [
        r
        for r in console.catalog.list_detections(limit=1000)
        if r.model_version == "v0002"
    ]
    assert len(rows) - 1 == len(shown)
    assert all(",v0002," in r for r in rows[1:])


def test_a_write_without_the_csrf_token_is_refused(
    page: Page, console: Console
) -> None:
    sign_in(page, console)
    page.goto(console.url + "/catalog")
    token = csrf_of(page)
    refused = page.request.post(
        console.url + "/catalog", form={"name": "Forged hat"}
    )  # the session cookie goes along; the token does not
    assert refused.status == 403 and "security token" in refused.text()
    foreign = page.request.post(
        console.url + "/catalog",
        form={"name": "Forged hat", "csrf_token": token},
        headers={"Origin": "http://evil.example"},
    )
    assert foreign.status == 403 and "another site" in foreign.text()
    assert console.catalog.list_categories(None, "Forged", 10, 0) == []


def test_each_role_sees_and_may_do_only_its_own(page: Page, console: Console) -> None:
    sign_in(page, console, "viewer")
    page.goto(console.url + "/catalog")
    expect(page.get_by_role("button", name="Add category")).to_have_count(0)
    expect(page.get_by_role("link", name="Audit log")).to_have_count(0)
    page.goto(console.url + "/audit")
    expect(page.get_by_role("heading", level=1)).to_have_text("Not allowed")
    page.goto(console.url + "/versions/v0001")
    expect(page.get_by_role("button", name=re.compile("Roll back"))).to_have_count(0)
    page.context.clear_cookies()
    sign_in(page, console, "device")
    expect(page.get_by_role("link", name="Catalog")).to_have_count(0)
    page.goto(console.url + "/catalog")
    expect(page.get_by_role("heading", level=1)).to_have_text("Not allowed")


def test_a_revoked_key_ends_its_session_at_the_next_request(
    page: Page, console: Console
) -> None:
    from fedobj.apikeys import hash_token, load_secret, new_token

    key = new_token()
    secret = load_secret(console.outputs / "api-secret")
    console.catalog.create_api_key(key.key_id, hash_token(secret, key.token), "viewer")
    console.served.keys["temp"] = key.token
    sign_in(page, console, "temp")
    console.catalog.revoke_api_key(key.key_id)
    page.goto(console.url + "/versions")
    expect(page).to_have_url(re.compile(r"/login\?.*reason=revoked"))
    expect(page.get_by_text("has been revoked")).to_be_visible()


def test_the_overview_follows_rounds_without_a_reload(
    page: Page, console: Console
) -> None:
    sign_in(page, console)
    page.goto(console.url + "/")
    expect(page.locator("#live-label")).to_have_text("live")
    run_id = f"live-{time.time_ns()}"
    catalog = console.catalog
    catalog.begin_run(
        run_id, strategy="fedprox", model="cnn", first_round=1, last_round=3
    )
    expect(page.locator("#overview-panel")).to_contain_text(run_id, timeout=2000)
    catalog.start_round(run_id, 1, 3)
    catalog.record_node_round(
        run_id, 1, "7", "train", error="shape mismatch: head.weight"
    )
    catalog.finish_round(run_id, 1, replied=2, rejected=1, accuracy=0.61)
    feed = page.locator("#round-feed")
    expect(feed).to_contain_text(
        "round 1: 2/3 nodes, 1 rejected (shape mismatch)", timeout=2000
    )
    expect(page.locator("#round-progress")).to_have_text("1 of 3")
    expect(page.locator("body")).to_have_attribute("data-chart-rounds", "1")
    shot(page, "console-overview-live")
    catalog.end_run(run_id, "failed", "RuntimeError: node lost")
    expect(page.locator("#overview-panel")).to_contain_text("node lost", timeout=2000)


def test_edit_asks_first_and_keeps_the_folder(page: Page, console: Console) -> None:
    made = console.catalog.add_category(f"Beanie {time.time_ns() % 10**6}")
    sign_in(page, console)
    page.goto(console.url + f"/catalog?q={made.slug}")
    page.get_by_role("link", name=f"Edit {made.name}").click()
    page.get_by_label("Name").fill(made.name + " hat")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Save").click()
    expect(page.locator(f'tr[data-slug="{made.slug}"]')).to_contain_text(" hat")
    assert console.catalog.get_category(made.slug).name == made.name + " hat"
