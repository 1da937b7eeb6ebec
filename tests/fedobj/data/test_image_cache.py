"""The decoded-image cache a SuperNode's ClientApps read: a memory-mapped .npy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedobj.data.image_folder import load_image_folder
from fedobj.data.node_data import load_node_data
from tests.conftest import write_image_folder


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("imagefolder-*.json"))


def test_the_cache_reads_back_equal_and_memory_mapped(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "dev", per_class=4, classes=3)
    (root / "trouser" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    cache = tmp_path / "cache"
    decoded, report = load_image_folder(root, 1, 28, cache)
    cached, again = load_image_folder(root, 1, 28, cache)
    assert isinstance(cached.images, np.memmap)  # not read whole per message
    assert not cached.images.flags.writeable
    np.testing.assert_array_equal(cached.images, decoded.images)
    np.testing.assert_array_equal(cached.labels, decoded.labels)
    assert cached.labels.dtype == np.int64
    assert cached.label_slugs == decoded.label_slugs
    assert again.to_dict() == report.to_dict()  # skipped files still reported
    (entry,) = _entries(cache)
    stem = entry.name.removesuffix(".json")
    names = {p.name for p in cache.iterdir()}
    assert names == {entry.name, f"{stem}.images.npy", f"{stem}.labels.npy"}


def test_a_changed_folder_gets_a_new_entry(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "dev", per_class=3, classes=2)
    cache = tmp_path / "cache"
    first, _ = load_image_folder(root, 1, 28, cache)
    png = next((root / "trouser").glob("*.png"))
    (root / "trouser" / "new.png").write_bytes(png.read_bytes())
    grown, _ = load_image_folder(root, 1, 28, cache)
    assert len(grown) == len(first) + 1
    assert len(_entries(cache)) == 2
    # an edited file (same name, new mtime) is a change too
    os.utime(png, ns=(1, 1))
    edited, _ = load_image_folder(root, 1, 28, cache)
    assert len(edited) == len(grown) and len(_entries(cache)) == 3


def test_an_entry_without_its_manifest_is_rebuilt(tmp_path: Path) -> None:
    """A writer killed between the arrays and the manifest leaves no entry."""
    root = write_image_folder(tmp_path / "dev", per_class=2, classes=2)
    cache = tmp_path / "cache"
    decoded, _ = load_image_folder(root, 1, 28, cache)
    (entry,) = _entries(cache)
    entry.unlink()
    stem = entry.name.removesuffix(".json")
    np.save(cache / f"{stem}.images.npy", np.zeros((1, 1, 28, 28), np.uint8))
    rebuilt, _ = load_image_folder(root, 1, 28, cache)
    np.testing.assert_array_equal(rebuilt.images, decoded.images)
    assert len(_entries(cache)) == 1
    again, _ = load_image_folder(root, 1, 28, cache)
    np.testing.assert_array_equal(again.images, decoded.images)


def test_a_node_trains_on_copies_of_the_mapped_cache(tmp_path: Path) -> None:
    """The node's train/held-out split indexes the read-only map: both are
    ordinary writable arrays in memory, and the cache file is left as it was."""
    root = write_image_folder(tmp_path / "dev", per_class=5, classes=2)
    cache = tmp_path / "cache"
    config = {"data-dir": str(root), "cache-dir": str(cache)}
    kwargs = {
        "partitioner": "iid",
        "alpha": 0.5,
        "classes_per_node": 2,
        "eval_fraction": 0.2,
        "seed": 3,
        "dataset_dir": "",
        "channels": 1,
        "size": 28,
    }
    load_image_folder(root, 1, 28, cache)  # a warm cache, as on every message
    node = load_node_data(config, **kwargs)  # type: ignore[arg-type]
    assert len(node.train) == 8 and len(node.eval) == 2
    assert node.train.images.flags.writeable and node.eval.images.flags.writeable
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    node.train.images[:] = 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
