"""Artifact store round trips and corruption detection; head growth (contract 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedobj.data.categories import fashion_mnist_class_map
from fedobj.model import Checkpoint, ModelArgs, build_model
from fedobj.model.factory import head_keys
from fedobj.model.growth import grow_head, grow_rows
from fedobj.registry import ArtifactError, ArtifactStore


def test_store_round_trip_atomic_and_verified(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "reg")
    art = store.put_bytes("run1/v1.bin", b"hello")
    assert art.size == 5 and Path(art.uri).read_bytes() == b"hello"
    assert store.read_verified(art.uri, art.sha256) == b"hello"
    assert not [p for p in (tmp_path / "reg" / "run1").iterdir() if ".tmp" in p.name]
    Path(art.uri).write_bytes(b"hellO")
    with pytest.raises(ArtifactError, match="corrupted"):
        store.read_verified(art.uri, art.sha256)
    store.delete(art.uri)
    with pytest.raises(ArtifactError, match="does not exist"):
        store.read_verified(art.uri, art.sha256)
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_store_accepts_pyarrow_uris(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/uri-store")
    art = store.put_bytes("a/b.bin", b"data")
    assert art.uri.startswith("file://")
    assert store.exists(art.uri)
    assert store.read_verified(art.uri, art.sha256) == b"data"


def test_checkpoint_through_the_store(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    args = ModelArgs("cnn", 10)
    model = build_model(args).eval()
    art = store.save_checkpoint(
        "v/ck.pt",
        Checkpoint(args, fashion_mnist_class_map(), model.state_dict(), round=2),
    )
    ck = store.load_checkpoint(art.uri, art.sha256)
    assert ck.class_map == fashion_mnist_class_map() and ck.round == 2
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(ck.build()(x), model(x))


@pytest.mark.parametrize("init", ["mean", "zeros"])
def test_grow_head_keeps_old_rows_bit_identical(init: str) -> None:
    args = ModelArgs("cnn", 6)
    model = build_model(args).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    keys = head_keys(args)
    grown = grow_head(state, keys, 6, 9, init=init, seed=1)
    for k in keys:
        assert grown[k].shape[0] == 9 and grown[k].dtype == state[k].dtype
        np.testing.assert_array_equal(grown[k][:6], state[k])
    other = next(k for k in state if k not in keys)
    assert grown[other] is state[other]
    # old-class logits unchanged before any training
    bigger = build_model(args.with_classes(9)).eval()
    bigger.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in grown.items()}
    )
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(bigger(x)[:, :6], model(x))


def test_grow_head_refuses_wrong_snapshot() -> None:
    w = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="expected 4"):
        grow_head({"w": w}, ("w",), 4, 6)
    with pytest.raises(ValueError, match="shrink"):
        grow_rows(w, 3)
    with pytest.raises(KeyError):
        grow_head({"w": w}, ("missing",), 5, 6)
