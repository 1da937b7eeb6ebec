"""The browser tier: Debian's Chromium driven by Playwright against a real
``fedobj admin serve`` process.

Playwright's own browser download cannot work offline, so Chromium is launched
by its path (``$FEDOBJ_CHROMIUM``, else ``/usr/bin/chromium``) with a fake
camera. Every test saves screenshots under ``outputs/screenshots/`` (not
committed) so a person can look at what the test saw.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from playwright.sync_api import Page, expect

from fedobj.catalog import SyncCatalog
from fedobj.registry import ArtifactStore
from tests.admin_api.conftest import (  # noqa: F401  (fixtures)
    make_keys,
    register_trained_version,
    trained_state,
)
from tests.admin_api.server import Served, serve
from tests.conftest import ROOT

CHROMIUM = Path(os.environ.get("FEDOBJ_CHROMIUM", "/usr/bin/chromium"))
SHOTS = ROOT / "outputs" / "screenshots"
AXE = ROOT / "tests" / "browser" / "vendor" / "axe-core" / "axe.min.js"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict[str, Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: apt-get install -y chromium "
            "(or set FEDOBJ_CHROMIUM)"
        )
    return {
        "executable_path": str(CHROMIUM),
        "args": [
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args() -> dict[str, Any]:
    return {"viewport": {"width": 1280, "height": 900}, "locale": "en-GB"}


@dataclass
class Console:
    """A served console and the catalog behind it."""

    served: Served
    catalog: SyncCatalog
    outputs: Path

    @property
    def url(self) -> str:
        return self.served.base_url

    def key(self, role: str) -> str:
        return self.served.keys[role]


def seed_run(catalog: SyncCatalog, run_id: str, rounds: int) -> None:
    """A finished run's rows, as the ServerApp writes them."""
    catalog.begin_run(
        run_id, strategy="fedavg", model="cnn", first_round=1, last_round=rounds
    )
    for r in range(1, rounds + 1):
        catalog.start_round(run_id, r, 3)
        for node in ("101", "102", "103"):
            catalog.record_node_round(
                run_id,
                r,
                node,
                "train",
                num_examples=100,
                loss=0.5,
                accuracy=0.8,
                train_seconds=0.4,
            )
            catalog.record_node_round(
                run_id, r, node, "evaluate", num_examples=20, loss=0.6, accuracy=0.7
            )
        catalog.finish_round(run_id, r, replied=3, rejected=0, accuracy=0.5 + r / 20)
    catalog.end_run(run_id, "completed")


@pytest.fixture(scope="module")
def console(
    tmp_path_factory: pytest.TempPathFactory,
    trained_state: dict[str, torch.Tensor],  # noqa: F811
) -> Iterator[Console]:
    """A real server over a SQLite catalog with two versions of a seeded run."""
    outputs = tmp_path_factory.mktemp("console")
    url = f"sqlite:///{outputs / 'catalog.db'}"
    catalog = SyncCatalog(url)
    catalog.migrate()
    catalog.seed_categories()
    seed_run(catalog, "test-run", 2)
    store = ArtifactStore(outputs)
    for r in (1, 2):
        register_trained_version(
            catalog, store, trained_state, catalog.snapshot(), round=r
        )
    keys = make_keys(catalog, outputs / "api-secret")
    with serve(outputs, url, keys, extra=("--rate-limit", "0")) as served:
        yield Console(served, catalog, outputs)


def sign_in(page: Page, console: Console, role: str = "admin") -> None:
    page.goto(console.url + "/login")
    page.get_by_label("API key").fill(console.key(role))
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def axe_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    page.evaluate(AXE.read_text())  # not a <script> tag: a strict CSP allows this
    result = page.evaluate("async () => await axe.run(document)")
    return [
        {
            "id": v["id"],
            "impact": v["impact"],
            "nodes": len(v["nodes"]),
            "help": v["help"],
            "target": v["nodes"][0]["target"] if v["nodes"] else [],
        }
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def csrf_of(page: Page) -> str:
    token = page.locator("body").get_attribute("data-csrf") or ""
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", token), token
    return token


__all__ = [
    "Console",
    "axe_violations",
    "csrf_of",
    "shot",
    "sign_in",
]
