"""Admin API fixtures: a real catalog (SQLite and PostgreSQL), a real registry
holding a briefly trained ``cnn`` version, real keys, and the app under Litestar's
test client (which runs the app's start-up and shut-down hooks)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from litestar.testing import TestClient
from PIL import Image

from admin_api import ApiSettings, create_app
from fedobj.apikeys import hash_token, load_secret, new_token
from fedobj.catalog import SyncCatalog, VersionRecord
from fedobj.classmap import ClassMap
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.model.checkpoint import Checkpoint
from fedobj.model.factory import ModelArgs, build_model
from fedobj.registry import ArtifactStore
from fedobj.train import LabelledTensors, TrainConfig, train
from tests.fedobj.catalog.conftest import (  # noqa: F401  (fixtures)
    _migrated_url,
    catalog_url,
    postgres_url,
)


@pytest.fixture(scope="session")
def trained_state() -> dict[str, torch.Tensor]:
    """A ``cnn`` trained for one epoch on the 3,000-image fixture (a few seconds):
    good enough that its top predictions mean something."""
    torch.manual_seed(0)
    data = load_fashion_mnist("train")
    model = build_model(ModelArgs(num_classes=10))
    tensors = LabelledTensors(
        torch.from_numpy(data.images), torch.from_numpy(data.labels.astype(np.int64))
    )
    train(model, tensors, TrainConfig(epochs=2, batch_size=32, lr=0.05))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def test_images() -> tuple[list[bytes], np.ndarray]:
    """Ten PNGs of the fixture's test split, one per class, and their labels."""
    data = load_fashion_mnist("test")
    picks = [int(np.flatnonzero(data.labels == c)[0]) for c in range(10)]
    return [png_bytes(data.images[i, 0]) for i in picks], data.labels[picks]


@dataclass
class ApiEnv:
    client: TestClient  # type: ignore[type-arg]
    catalog: SyncCatalog
    store: ArtifactStore
    outputs: Path
    version: VersionRecord
    keys: dict[str, str]

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def make_keys(catalog: SyncCatalog, secret_file: Path) -> dict[str, str]:
    secret = load_secret(secret_file)
    keys = {}
    for role in ("admin", "viewer", "device"):
        key = new_token()
        catalog.create_api_key(key.key_id, hash_token(secret, key.token), role, role)
        keys[role] = key.token
    return keys


def register_trained_version(
    catalog: SyncCatalog,
    store: ArtifactStore,
    state: dict[str, torch.Tensor],
    class_map: ClassMap,
    round: int = 1,
) -> VersionRecord:
    ckpt = Checkpoint(ModelArgs(num_classes=class_map.num_classes), class_map, state)
    art = store.save_checkpoint(f"test-run/round-{round:04d}.pt", ckpt)
    return catalog.register_version(
        run_id="test-run",
        round=round,
        class_map=class_map,
        metrics={"accuracy": 0.8, "class-0-accuracy": 0.75},
        checkpoint_uri=art.uri,
        checkpoint_sha256=art.sha256,
        size_bytes=art.size,
    )


@pytest.fixture
def api(
    catalog_url: str,  # noqa: F811
    tmp_path: Path,
    trained_state: dict[str, torch.Tensor],
) -> Iterator[ApiEnv]:
    catalog = SyncCatalog(catalog_url)
    catalog.seed_categories()
    store = ArtifactStore(tmp_path)
    version = register_trained_version(
        catalog, store, trained_state, catalog.snapshot()
    )
    keys = make_keys(catalog, tmp_path / "api-secret")
    settings = ApiSettings(
        outputs_dir=tmp_path,
        database_url=catalog_url,
        rate_limit_per_second=0,
        key_cache_seconds=0.0,
        max_batch_images=4,
    )
    with TestClient(create_app(settings)) as client:
        yield ApiEnv(client, catalog, store, tmp_path, version, keys)
