"""The real server process (``fedobj admin serve``) over HTTP on 127.0.0.1, and
schemathesis against its own OpenAPI schema: no request may get a 5xx.

One server per database kind for the module; it is stopped (SIGTERM, then
SIGKILL after a grace period) and checked gone at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings

from fedobj.catalog import SyncCatalog
from fedobj.registry import ArtifactStore
from tests.admin_api.conftest import make_keys, png_bytes, register_trained_version
from tests.conftest import ROOT, free_port
from tests.fedobj.catalog.conftest import KINDS, _empty_database

FEDOBJ = str(Path(sys.executable).with_name("fedobj"))


@dataclass
class Served:
    base_url: str
    keys: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture(scope="module", params=KINDS)
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    trained_state: dict[str, torch.Tensor],
) -> Iterator[Served]:
    outputs = tmp_path_factory.mktemp(f"served-{request.param}")
    with _empty_database(request.param, request) as url:
        catalog = SyncCatalog(url)
        catalog.migrate()
        catalog.seed_categories()
        register_trained_version(
            catalog, ArtifactStore(outputs), trained_state, catalog.snapshot()
        )
        keys = make_keys(catalog, outputs / "api-secret")
        port = free_port()
        log = outputs / "server.log"
        env = {**os.environ, "FEDOBJ_OUTPUTS_DIR": str(outputs)}
        env.pop("FEDOBJ_API_SECRET", None)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [
                    FEDOBJ,
                    "admin",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--db",
                    url,
                    "--rate-limit",
                    "0",
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield Served(base, keys, proc, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            assert proc.returncode is not None


def test_real_server_over_http(served: Served) -> None:
    with httpx.Client(base_url=served.base_url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        assert http.get("/api/v1/categories").status_code == 401
        listed = http.get("/api/v1/categories", headers=served.auth("viewer")).json()
        assert listed["total"] >= 10
        made = http.post(
            "/api/v1/categories",
            json={"name": f"Umbrella {time.time_ns()}"},
            headers=served.auth("admin"),
        )
        assert made.status_code == 201, made.text
        image = png_bytes(__import__("numpy").full((28, 28), 200, dtype="uint8"))
        det = http.post(
            "/api/v1/detect",
            files={"image": ("a.png", image, "image/png")},
            headers=served.auth("device"),
        )
        assert det.status_code == 200, det.text
        assert det.json()["model_version"] == "v0001"
        too_big = http.post(
            "/api/v1/detect",
            files={"image": ("a.png", b"\x00" * (11 * 1024 * 1024), "image/png")},
            headers=served.auth("device"),
        )
        assert too_big.status_code == 413
        assert http.get("/health").status_code == 200  # still up


def test_no_server_errors_for_generated_requests(served: Served) -> None:
    """Any request the schema allows, valid or not, gets a non-5xx answer.

    Drives schemathesis' per-operation Hypothesis strategies directly (its pytest
    plugin does not run under pytest 9), 25 derandomised examples per operation,
    as an admin so every route is reachable.
    """
    schema = schemathesis.openapi.from_url(f"{served.base_url}/schema/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(
                base_url=served.base_url, headers=served.auth("admin"), timeout=60
            )
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> "
                    f"{response.status_code}: {response.text[:300]}"
                )

        check()
    assert operations >= 15
    assert not failures, (
        "\n".join(failures[:10]) + "\n" + served.log.read_text()[-3000:]
    )
