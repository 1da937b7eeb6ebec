"""Fashion-MNIST reader, categories and slugs, partitioners, image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedobj.data import partition as P
from fedobj.data.categories import FASHION_MNIST_SLUGS, fashion_mnist_class_map, slugify
from fedobj.data.fashion_mnist import (
    load_fashion_mnist,
    read_idx,
    resolve_fashion_mnist_dir,
    write_idx,
)
from fedobj.data.image_folder import check_image_folder, load_image_folder
from fedobj.data.node_data import adapt_images, load_node_data
from fedobj.errors import ConfigError, DatasetNotFoundError, EmptyDatasetError
from tests.conftest import write_image_folder


def test_slugs_are_contract_8() -> None:
    assert slugify("T-shirt/top") == "t-shirt-top"
    assert slugify("  Ankle boot ") == "ankle-boot"
    assert slugify("Café Crème") == "cafe-creme"
    assert FASHION_MNIST_SLUGS[0] == "t-shirt-top"
    assert len(set(FASHION_MNIST_SLUGS)) == 10
    with pytest.raises(ValueError):
        slugify("///")


def test_fashion_mnist_class_map_is_dense_and_named() -> None:
    cm = fashion_mnist_class_map()
    assert cm.num_classes == 10
    assert cm.names_by_index()[0] == "T-shirt/top"
    assert cm.slug_to_index["ankle-boot"] == 9


def test_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)


def test_idx_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


def test_fixture_subset_loads_with_labels(fmnist_dir: Path) -> None:
    train = load_fashion_mnist("train", fmnist_dir)
    test = load_fashion_mnist("test", fmnist_dir)
    assert train.images.shape == (3000, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (1000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [300] * 10
    assert train.label_slugs == FASHION_MNIST_SLUGS


def test_missing_dataset_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDOBJ_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr("fedobj.data.fashion_mnist.DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(DatasetNotFoundError) as err:
        resolve_fashion_mnist_dir()
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "FEDOBJ_FASHION_MNIST_DIR" in msg and "data-dir" in msg


@pytest.mark.parametrize("method", ["iid", "dirichlet", "k-classes"])
def test_partitions_cover_each_sample_once_and_are_deterministic(method: str) -> None:
    labels = np.repeat(np.arange(10), 100)
    a = P.partition(labels, 7, method, seed=3, alpha=0.3, classes_per_node=3)
    b = P.partition(labels, 7, method, seed=3, alpha=0.3, classes_per_node=3)
    c = P.partition(labels, 7, method, seed=4, alpha=0.3, classes_per_node=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    allidx = np.concatenate(a)
    assert len(allidx) == len(set(allidx.tolist()))
    if method != "k-classes":  # k-classes may leave a class unheld by design
        assert sorted(allidx.tolist()) == list(range(1000))
    assert all(len(p) > 0 for p in a)


def test_dirichlet_is_skewed_and_iid_is_not() -> None:
    labels = np.repeat(np.arange(10), 600)
    skew = P.dirichlet(labels, 10, alpha=0.1, seed=0)
    flat = P.iid(labels, 10, seed=0)

    def max_share(parts: list[np.ndarray]) -> float:
        return float(
            np.mean(
                [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
            )
        )

    assert max_share(skew) > 0.5
    assert max_share(flat) < 0.2


def test_k_classes_gives_each_node_k_classes() -> None:
    labels = np.repeat(np.arange(10), 50)
    parts = P.k_classes(labels, 5, k=2, seed=1)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)


def test_partition_bad_input_names_the_key() -> None:
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ConfigError, match="dirichlet-alpha"):
        P.partition(labels, 2, "dirichlet", 0, alpha=0.0)
    with pytest.raises(ConfigError, match="partitioner"):
        P.partition(labels, 2, "random", 0)
    with pytest.raises(ConfigError, match="classes-per-node"):
        P.partition(labels, 2, "k-classes", 0, classes_per_node=5)
    with pytest.raises(ConfigError, match="cannot split"):
        P.partition(labels, 11, "iid", 0)


def test_train_eval_split_disjoint() -> None:
    tr, ev = P.train_eval_split(50, 0.2, seed=1)
    assert len(ev) == 10 and len(tr) == 40
    assert not set(tr.tolist()) & set(ev.tolist())


def test_image_folder_skips_and_counts_bad_files(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "dev", per_class=4, classes=3)
    (root / "trouser" / "notes.txt").write_text("not an image")
    (root / "trouser" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "pullover" / ".DS_Store").write_bytes(b"\0\0")
    data, report = load_image_folder(root, channels=1, size=28)
    assert report.counts == {"t-shirt-top": 4, "trouser": 4, "pullover": 4}
    assert len(data) == 12 and data.images.shape == (12, 1, 28, 28)
    reasons = dict(report.skipped)
    assert reasons["trouser/notes.txt"].startswith("not an image")
    assert reasons["trouser/broken.jpg"].startswith("unreadable")
    assert reasons["pullover/.DS_Store"] == "hidden file"
    assert check_image_folder(root).counts == report.counts


def test_image_folder_colour_any_size_and_disk_cache(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "dev", per_class=3, classes=2, colour=True)
    cache = tmp_path / "cache"
    data, _ = load_image_folder(root, channels=3, size=32, cache_dir=cache)
    assert data.images.shape == (6, 3, 32, 32)
    assert len(list(cache.glob("imagefolder-*.json"))) == 1
    again, report = load_image_folder(root, channels=3, size=32, cache_dir=cache)
    np.testing.assert_array_equal(again.images, data.images)
    assert report.total == 6
    # a new file changes the key: the cache never serves stale data
    (root / "trouser" / "new.png").write_bytes(
        (root / "trouser").glob("*.png").__next__().read_bytes()
    )
    grown, _ = load_image_folder(root, channels=3, size=32, cache_dir=cache)
    assert len(grown) == 7


def test_empty_image_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "shoe").mkdir()
    (tmp_path / "shoe" / "readme.md").write_text("x")
    with pytest.raises(EmptyDatasetError, match="no usable images"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetNotFoundError):
        load_image_folder(tmp_path / "missing")


def test_adapt_images_resizes_and_changes_channels() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    out = adapt_images(imgs, 3, 32)
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.uint8
    assert np.array_equal(out[:, 0], out[:, 1])
    assert adapt_images(out, 1, 32).shape == (5, 1, 32, 32)


def test_node_data_from_partition_and_from_folder(tmp_path: Path) -> None:
    common = dict(
        partitioner="dirichlet",
        alpha=0.5,
        classes_per_node=2,
        eval_fraction=0.1,
        seed=1,
        dataset_dir="",
        channels=1,
        size=28,
    )
    parts = [
        load_node_data({"partition-id": i, "num-partitions": 3}, **common)
        for i in range(3)
    ]
    total = sum(len(p.train) + len(p.eval) for p in parts)
    assert total == 3000
    root = write_image_folder(tmp_path / "dev", per_class=5, classes=2)
    node = load_node_data(
        {"data-dir": str(root), "cache-dir": str(tmp_path / "c")}, **common
    )
    assert len(node.train) + len(node.eval) == 10
    with pytest.raises(ConfigError, match="data-dir"):
        load_node_data({}, **common)
    with pytest.raises(ConfigError, match="absolute"):
        load_node_data({"data-dir": "relative/dir"}, **common)


def test_disjoint_class_split_for_the_class_incremental_scenario() -> None:
    from fedobj.data.node_data import new_category_nodes

    new = new_category_nodes(10, 0.3, seed=1)
    assert len(new) == 3 and new == new_category_nodes(10, 0.3, seed=1)
    common = dict(
        partitioner="iid",
        alpha=0.5,
        classes_per_node=2,
        eval_fraction=0.1,
        seed=1,
        dataset_dir="",
        channels=1,
        size=28,
        split=(6, 0.3),
    )
    for pid in range(10):
        node = load_node_data({"partition-id": pid, "num-partitions": 10}, **common)
        labels = set(node.train.labels.tolist()) | set(node.eval.labels.tolist())
        if pid in new:
            assert labels and min(labels) >= 6
        else:
            assert labels and max(labels) < 6
