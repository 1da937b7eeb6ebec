"""A real run whose registry is a real S3 server, named only by the environment.

``moto_server`` on 127.0.0.1 with one bucket; a simulation SuperLink whose
environment carries ``FEDOBJ_REGISTRY_URI`` (and credentials, which ``pyarrow.fs``
reads from there) and nothing else about the registry: no ``registry-uri`` in the
run config, none in the environment of ``fedobj run``. The run writes both rounds'
checkpoints to the bucket and records URIs that carry the endpoint; ``fedobj
export`` and ``fedobj detect`` then read them with the same one setting.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedobj.adminproc import FEDOBJ
from fedobj.catalog import SyncCatalog
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.registry import REGISTRY_ENV
from fedobj.superlink import LocalSuperLink, _alive, descendants
from tests.admin_api.conftest import png_bytes
from tests.admin_api.test_registry_s3 import AWS_ENV, BUCKET, S3Server, _fedobj, s3
from tests.conftest import FIXTURE_FMNIST, ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
__all__ = ["s3"]  # the moto_server fixture, module-scoped

PREFIX = "fleet"


@pytest.fixture
def s3_superlink(
    s3: S3Server, tmp_path: Path
) -> Iterator[tuple[LocalSuperLink, Path, str]]:
    """A SuperLink on free ports whose environment names the S3 registry;
    stopped with everything it started."""
    outputs, registry = tmp_path / "outputs", s3.registry(PREFIX)
    link = LocalSuperLink(
        tmp_path / "flwr-home",
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(outputs),
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
            REGISTRY_ENV: registry,
            **AWS_ENV,
        },
    )
    pid = link.start()
    try:
        yield link, outputs, registry
    finally:
        tree = {pid} | descendants(pid)
        link.stop()
        left = sorted(p for p in tree if _alive(p))
        assert not left, f"processes left running after stop: {left}"


def test_a_run_writes_its_versions_to_s3_and_the_cli_reads_them(
    s3: S3Server,
    s3_superlink: tuple[LocalSuperLink, Path, str],
    tmp_path: Path,
) -> None:
    link, outputs, registry = s3_superlink
    env = link.cli_env()
    env.pop(REGISTRY_ENV)  # the SuperLink's environment is the only setting
    for name in AWS_ENV:
        env.pop(name, None)
    run = subprocess.run(
        [FEDOBJ, "run", "--app", str(ROOT), "--outputs", str(outputs)]
        + ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
        + ["--run-config", 'num-server-rounds=2 min-nodes=2 partitioner="iid"'],
        cwd=ROOT,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "round 2/2" in run.stdout, run.stdout[-4000:]

    catalog = SyncCatalog(None, default_path=outputs / "catalog.db")
    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    assert [(v.name, v.round) for v in versions] == [("v0001", 1), ("v0002", 2)]
    run_id = versions[0].run_id
    bucket = s3.fs()
    for v in versions:
        key = f"{BUCKET}/{PREFIX}/{run_id}/round-{v.round:03d}.pt"
        assert v.checkpoint_uri == (
            f"s3://{key}?endpoint_override={s3.endpoint}&scheme=http&region=us-east-1"
        )
        with bucket.open_input_stream(key) as stored:  # the bytes that were hashed
            assert hashlib.sha256(stored.read()).hexdigest() == v.checkpoint_sha256
    assert not list(outputs.rglob("*.pt"))  # no checkpoint fell back to the disk

    # the CLI, told where the registry is by the environment alone
    onnx = tmp_path / "v0002.onnx"
    done = _fedobj(outputs, registry, "export", "v0002", "-f", "onnx", "-o", str(onnx))
    assert done.returncode == 0, done.stderr
    entry = catalog.get_version(versions[1].id).artifacts["onnx"]
    assert str(entry["uri"]).startswith(f"s3://{BUCKET}/{PREFIX}/versions/v0002/")
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == entry["sha256"]
    assert bucket.get_file_info(f"{BUCKET}/{PREFIX}/versions/v0002/model.onnx").size

    data = load_fashion_mnist("test")
    image = tmp_path / "boot.png"
    image.write_bytes(png_bytes(data.images[0, 0]))
    done = _fedobj(outputs, registry, "detect", str(image), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[0])
    assert result["model_version"] == "v0002" and result["predictions"], result
