"""Shared fixtures. Every test reads Fashion-MNIST from the committed subset, never
from the system package, so the suite runs the same on any machine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedobj.adminproc import free_port

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_FMNIST = ROOT / "tests" / "fixtures" / "fashion-mnist"
os.environ["FEDOBJ_FASHION_MNIST_DIR"] = str(FIXTURE_FMNIST)

__all__ = ["free_port"]  # tests bind servers to 127.0.0.1 through it


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    return FIXTURE_FMNIST


def write_image_folder(
    root: Path,
    per_class: int = 20,
    classes: int = 10,
    offset: int = 0,
    colour: bool = False,
) -> Path:
    """Write real Fashion-MNIST images as PNG/JPEG into ``root/<slug>/``."""
    from fedobj.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist("train")
    for c in range(classes):
        slug = data.label_slugs[c]
        folder = root / slug
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(data.labels == c)[offset : offset + per_class]
        for j, i in enumerate(idx):
            img = Image.fromarray(data.images[i, 0])
            if colour:
                img = img.convert("RGB").resize((40, 40))
            ext = "png" if j % 2 == 0 else "jpg"
            img.save(folder / f"{i}.{ext}")
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests last: Playwright's sync API keeps an event loop running in
    the main thread until the session ends, and every later ``asyncio.run`` (the
    CLI in-process, the catalog's async tests) would fail on it."""
    browser = ROOT / "tests" / "browser"
    items.sort(key=lambda item: Path(str(item.fspath)).is_relative_to(browser))
