"""The whole admin path: a category added over HTTP while `flwr run` goes on.

A real SuperLink runs a Ray simulation; a real `fedobj admin serve` process serves
the same SQLite catalog and registry; keys come from `fedobj admin keys create`.
The category added over HTTP after round 1 must be in a later round's head, and
`/detect` with the new current version must recognise images of it.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fedobj.catalog import SyncCatalog
from fedobj.data.fashion_mnist import load_fashion_mnist
from tests.admin_api.server import FEDOBJ, serve
from tests.apps.test_catalog_e2e import finish, start_run, wait_for_round
from tests.apps.test_flwr_run_e2e import superlink  # noqa: F401  (fixture)
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
BAG = 8  # Fashion-MNIST label of "Bag"


def create_key(role: str, db: Path, outputs: Path) -> str:
    done = subprocess.run(
        [FEDOBJ, "admin", "keys", "create", "--role", role, "--db", str(db)]
        + ["--outputs", str(outputs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "not shown again" in done.stderr
    token = done.stdout.strip()
    assert token.startswith("fo_") and token not in (outputs / "api-secret").read_text()
    return token


def test_category_added_over_http_is_learned_and_detected(
    superlink,  # noqa: F811
    tmp_path: Path,
) -> None:
    link, _ = superlink
    db = tmp_path / "admin.db"
    registry = tmp_path / "registry"
    proc = start_run(
        link,
        db,
        f'num-server-rounds=5 initial-categories=6 registry-uri="{registry}"',
    )
    catalog = SyncCatalog(db)
    wait_for_round(catalog, 1, proc)
    keys = {r: create_key(r, db, tmp_path) for r in ("admin", "device", "viewer")}
    with (
        serve(tmp_path, f"sqlite:///{db}", keys, registry=registry) as api,
        httpx.Client(base_url=api.base_url, timeout=120) as http,
    ):
        made = http.post(
            "/api/v1/categories", json={"name": "Bag"}, headers=api.auth("admin")
        )
        assert made.status_code == 201, made.text
        assert made.json()["class_index"] == 6  # the next never-used index
        finish(proc)

        current = http.get("/api/v1/versions/current", headers=api.auth("viewer"))
        body = current.json()
        assert body["round"] == 5 and body["num_classes"] == 7
        assert body["class_map"][6]["slug"] == "bag"
        versions = http.get("/api/v1/versions", headers=api.auth("viewer")).json()
        sizes = {v["round"]: v["num_classes"] for v in versions["items"]}
        assert sizes[1] == 6 and sizes[5] == 7

        test = load_fashion_mnist("test")
        bags = np.flatnonzero(test.labels == BAG)[:10]
        top1 = []
        for i in bags:
            buf = io.BytesIO()
            Image.fromarray(test.images[i, 0]).save(buf, format="PNG")
            det = http.post(
                "/api/v1/detect?top_k=3",
                files={"image": ("bag.png", buf.getvalue(), "image/png")},
                headers=api.auth("device"),
            )
            assert det.status_code == 200, det.text
            assert det.json()["model_version"] == body["name"]
            top1.append(det.json()["predictions"][0]["object_name"])
        assert top1.count("Bag") >= 6, top1

        audit = http.get("/api/v1/audit", headers=api.auth("admin")).json()["items"]
        assert [a["action"] for a in audit][:1] == ["category.create"]
