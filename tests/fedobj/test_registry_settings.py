"""Where every process finds the registry, what a recorded URI keeps, and a full
disk under the registry (a real 1 MB tmpfs this test mounts: CI runs as root)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from admin_api import ApiSettings
from fedobj.config import RunConfig
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.model import Checkpoint, ModelArgs, build_model
from fedobj.registry import (
    REGISTRY_ENV,
    ArtifactError,
    ArtifactStore,
    ArtifactWriteError,
    public_uri,
    resolve_registry_root,
)

S3 = "s3://reg/models?endpoint_override=127.0.0.1:9&scheme=http&region=eu-west-1"


def test_one_rule_for_the_run_the_cli_and_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert resolve_registry_root(None, tmp_path) == str(tmp_path)
    assert RunConfig().resolve_registry_uri(tmp_path) == str(tmp_path)
    assert ApiSettings(outputs_dir=tmp_path).registry_root == str(tmp_path)
    monkeypatch.setenv(REGISTRY_ENV, S3)
    assert resolve_registry_root("", tmp_path) == S3
    assert RunConfig().resolve_registry_uri(tmp_path) == S3
    assert ApiSettings(outputs_dir=tmp_path).registry_root == S3
    # a process's own setting wins over the environment
    assert resolve_registry_root("/elsewhere", tmp_path) == "/elsewhere"
    explicit = RunConfig.from_flower({"registry-uri": "/r"})
    assert explicit.resolve_registry_uri(tmp_path) == "/r"
    assert ApiSettings(outputs_dir=tmp_path, registry_uri="/a").registry_root == "/a"


def test_recorded_uris_keep_where_to_connect_never_credentials() -> None:
    uri = (
        "s3://AKIDEXAMPLE:s3cr3t@bucket/prefix/x.pt?endpoint_override=10.0.0.2:9000"
        "&scheme=http&region=us-east-1&allow_bucket_creation=true"
    )
    assert public_uri(uri) == (
        "s3://bucket/prefix/x.pt?endpoint_override=10.0.0.2:9000&scheme=http"
        "&region=us-east-1"
    )
    assert public_uri("/local/x.pt") == "/local/x.pt"
    assert public_uri("file:///tmp/x.pt") == "file:///tmp/x.pt"


def test_a_store_reads_versions_recorded_under_another_local_root(
    tmp_path: Path,
) -> None:
    old = ArtifactStore(tmp_path / "old-registry")
    art = old.put_bytes("run/round-001.pt", b"weights")
    here = ArtifactStore(tmp_path / "new-registry")
    assert not here.holds(art.uri) and old.holds(art.uri)
    assert here.read_verified(art.uri, art.sha256) == b"weights"
    assert here.exists(art.uri)


def test_a_file_uri_store_holds_what_it_recorded(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/reg")
    art = store.put_bytes("a/b.bin", b"data")
    assert art.uri == f"file://{tmp_path}/reg/a/b.bin" and store.holds(art.uri)
    assert not store.holds(f"file://{tmp_path}/other/a/b.bin")
    assert not store.holds(f"s3://{tmp_path}/reg/a/b.bin")


def test_a_store_that_cannot_be_opened_says_so_in_one_line() -> None:
    with pytest.raises(ArtifactError, match=r"cannot open registry s3://reg/models\?"):
        ArtifactStore(S3.replace("region=eu-west-1", "colour=blue"))


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted for the test and always unmounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why} (CI=true runs as root: the full-disk test is required)")
        pytest.skip(why)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.faults
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_full_disk_names_the_file_and_the_free_space(
    tiny_disk: Path, scheme: str
) -> None:
    store = ArtifactStore(f"{scheme}{tiny_disk / 'reg'}")
    before = store.put_bytes("run/round-002.server.npz", b"x" * 1000)
    args = ModelArgs("cnn", 10)  # 1.7 MB as a checkpoint: more than the disk
    ckpt = Checkpoint(args, fashion_mnist_class_map(), build_model(args).state_dict())
    with pytest.raises(ArtifactWriteError) as caught:
        store.save_checkpoint("run/round-003.pt", ckpt)
    message = str(caught.value)
    target = tiny_disk / "reg" / "run" / "round-003.pt"
    shown = re.escape(f"{scheme}{target}")
    assert re.fullmatch(
        rf"cannot write checkpoint {shown} \(1\.\d MB\): no space left on device "
        rf"\(\d\.\d MB free on {re.escape(str(tiny_disk))}\)",
        message,
    ), message
    assert isinstance(caught.value, ArtifactError)  # a domain error, one line
    # nothing half-written is left to be taken for a checkpoint
    assert sorted(p.name for p in target.parent.iterdir()) == ["round-002.server.npz"]
    assert store.read_verified(before.uri, before.sha256) == b"x" * 1000
    # the space comes back: the next write succeeds
    store.delete(before.uri)
    assert store.put_bytes("run/round-004.bin", b"y" * 1000).size == 1000
