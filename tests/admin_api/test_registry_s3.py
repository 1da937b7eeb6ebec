"""The registry in object storage: a real S3 server (moto's server mode) on
127.0.0.1, versions written there, and every process finding them through
``FEDOBJ_REGISTRY_URI`` alone: ``fedobj export``, ``fedobj detect``, ``fedobj
versions rollback`` and a real ``fedobj admin serve``. A tampered object is refused
by its hash; a version recorded without its endpoint is found through the setting,
and without it the command names the setting in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pyarrow import fs as pafs

from fedobj.catalog import SyncCatalog
from fedobj.model.checkpoint import Checkpoint
from fedobj.model.factory import ModelArgs
from fedobj.registry import REGISTRY_ENV, ArtifactStore
from tests.admin_api.conftest import make_keys, png_bytes, register_trained_version
from tests.admin_api.server import FEDOBJ, serve
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.faults

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
BUCKET = "fedobj-reg"
# moto takes any credentials; pyarrow reads them from the environment, as it would
# real ones (and must not wait for an EC2 metadata service that is not there).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    endpoint: str  # host:port

    def registry(self, prefix: str) -> str:
        return (
            f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}"
            "&scheme=http&region=us-east-1"
        )

    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            access_key="testing",
            secret_key="testing",
            allow_bucket_creation=True,
        )


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``moto_server`` on a free 127.0.0.1 port with one bucket; always stopped."""
    if not MOTO_SERVER.exists():
        why = f"{MOTO_SERVER} missing: install the dev extras (moto[server])"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except (urllib.error.URLError, OSError) as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not come up ({exc}):\n{log.read_text()}"
                    ) from exc
                time.sleep(0.2)
        server = S3Server(f"127.0.0.1:{port}")
        server.fs().create_dir(BUCKET)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(REGISTRY_ENV, raising=False)


def _fedobj(
    outputs: Path, registry: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    """A real ``fedobj`` process whose only registry setting is the environment."""
    env = {**os.environ, **AWS_ENV, "FEDOBJ_OUTPUTS_DIR": str(outputs)}
    env["COLUMNS"] = "400"
    env.pop(REGISTRY_ENV, None)
    if registry is not None:
        env[REGISTRY_ENV] = registry
    done = subprocess.run(
        [FEDOBJ, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr + done.stdout
    return lines[0]


def test_versions_in_s3_are_served_by_every_process(
    s3: S3Server,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    trained_state: dict[str, torch.Tensor],
) -> None:
    registry = s3.registry("registry")
    catalog = SyncCatalog(None, default_path=tmp_path / "catalog.db")
    catalog.migrate()
    catalog.seed_categories()
    snapshot = catalog.snapshot()
    v1 = register_trained_version(
        catalog, ArtifactStore(registry), trained_state, snapshot, round=1
    )
    # a root that carries credentials in the URI records none of them
    with_keys = registry.replace("s3://", "s3://testing:testing@")
    v2 = register_trained_version(
        catalog, ArtifactStore(with_keys), trained_state, snapshot, round=2
    )
    for v in (v1, v2):
        assert v.checkpoint_uri == (
            f"s3://{BUCKET}/registry/test-run/round-{v.round:04d}.pt"
            f"?endpoint_override={s3.endpoint}&scheme=http&region=us-east-1"
        )
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(np.full((28, 28), 90, np.uint8)))

    # the CLI: export and detect with the registry named by the environment only
    onnx = tmp_path / "v0002.onnx"
    done = _fedobj(tmp_path, registry, "export", "v0002", "-f", "onnx", "-o", str(onnx))
    assert done.returncode == 0, done.stderr
    entry = catalog.get_version(v2.id).artifacts["onnx"]
    assert str(entry["uri"]).startswith(f"s3://{BUCKET}/registry/versions/v0002/")
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == entry["sha256"]
    assert not (tmp_path / "versions").exists()  # nothing fell back to the disk
    assert s3.fs().get_file_info(f"{BUCKET}/registry/versions/v0002/model.onnx").size
    done = _fedobj(tmp_path, registry, "detect", str(image), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["model_version"] == "v0002"

    # a recorded URI opens on its own: no registry setting at all
    done = _fedobj(tmp_path, None, "detect", str(image), "--json")
    assert done.returncode == 0, done.stderr

    # rollback: the older version is served from the bucket (exported there now)
    done = _fedobj(tmp_path, registry, "versions", "rollback", "v0001")
    assert done.returncode == 0, done.stderr
    done = _fedobj(tmp_path, registry, "detect", str(image), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["model_version"] == "v0001"
    assert str(catalog.get_version(v1.id).artifacts["onnx"]["uri"]).startswith("s3://")

    # the admin API: downloads, a rollback and detection read the bucket
    keys = make_keys(catalog, tmp_path / "api-secret")
    monkeypatch.setenv(REGISTRY_ENV, registry)  # serve() passes its environment on
    with (
        serve(tmp_path, str(tmp_path / "catalog.db"), keys) as served,
        httpx.Client(base_url=served.base_url, timeout=120) as http,
    ):
        got = http.get(
            f"/api/v1/versions/{v2.id}/download",
            params={"format": "checkpoint"},
            headers=served.auth("viewer"),
        )
        assert got.status_code == 200, got.text
        assert hashlib.sha256(got.content).hexdigest() == v2.checkpoint_sha256
        back = http.post(
            f"/api/v1/versions/{v2.id}/rollback", headers=served.auth("admin")
        )
        assert back.status_code == 200 and back.json()["is_current"]
        got = http.get(
            f"/api/v1/versions/{v2.id}/download",
            params={"format": "onnx"},
            headers=served.auth("viewer"),
        )
        assert got.status_code == 200 and got.content == onnx.read_bytes()
        det = http.post(
            "/api/v1/detect",
            files={"image": ("x.png", image.read_bytes(), "image/png")},
            headers=served.auth("device"),
        )
        assert det.status_code == 200, det.text
        assert det.json()["model_version"] == "v0002"

        # tampered in the bucket: refused by its hash, and the API stays up
        key = f"{BUCKET}/registry/test-run/round-0001.pt"
        with s3.fs().open_output_stream(key) as out:
            out.write(b"not the checkpoint that was trained")
        bad = http.get(
            f"/api/v1/versions/{v1.id}/download",
            params={"format": "checkpoint"},
            headers=served.auth("viewer"),
        )
        assert bad.status_code == 500
        assert "is corrupted or was replaced" in bad.json()["detail"]
        assert http.get("/health").status_code == 200
    line = _error_line(_fedobj(tmp_path, registry, "export", "v0001", "-f", "int8"))
    assert f"artifact s3://{BUCKET}/registry/test-run/round-0001.pt?" in line
    assert "is corrupted or was replaced" in line and "refusing to load it" in line


def test_a_version_recorded_without_its_endpoint(
    s3: S3Server,
    aws: None,
    tmp_path: Path,
    trained_state: dict[str, torch.Tensor],
) -> None:
    """Recorded as a bare ``s3://bucket/key`` (as before URIs kept their options):
    found through the registry setting whose bucket and prefix hold it; without
    the setting, one line names it."""
    registry = s3.registry("bare")
    catalog = SyncCatalog(None, default_path=tmp_path / "catalog.db")
    catalog.migrate()
    catalog.seed_categories()
    store = ArtifactStore(registry)
    snapshot = catalog.snapshot()
    art = store.save_checkpoint(
        "old-run/round-0001.pt",
        Checkpoint(ModelArgs(num_classes=10), snapshot, trained_state),
    )
    bare = art.uri.split("?")[0]
    catalog.register_version(
        run_id="old-run",
        round=1,
        class_map=snapshot,
        metrics={},
        checkpoint_uri=bare,
        checkpoint_sha256=art.sha256,
        size_bytes=art.size,
    )
    done = _fedobj(tmp_path, registry, "export", "current", "-f", "onnx")
    assert done.returncode == 0, done.stderr
    line = _error_line(_fedobj(tmp_path, None, "export", "current", "-f", "int8"))
    assert f"artifact {bare} is outside this process's registry" in line
    assert f"set {REGISTRY_ENV}" in line
