"""Fashion-MNIST from its gzipped IDX files, read with numpy.

Where the files are looked for, in order: an explicit directory, the
``FEDOBJ_FASHION_MNIST_DIR`` environment variable, and the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Nothing is ever
downloaded implicitly: :func:`download_fashion_mnist` is the explicit online fallback.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedobj.data.categories import FASHION_MNIST_SLUGS
from fedobj.errors import DatasetNotFoundError

ENV_DIR = "FEDOBJ_FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_HOW_TO_GET = (
    "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` "
    f"(files land in {DEBIAN_DIR}), or point {ENV_DIR} (or the run config key "
    "`dataset-dir`) at a folder holding the four *-ubyte.gz files, or train on your "
    "own image folders with the node config `data-dir`."
)


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """Images as uint8 ``(N, C, H, W)`` plus integer labels and the label slugs.

    ``label_slugs[labels[i]]`` is the category folder name of image ``i``; clients map
    those slugs through the run's class map, never the raw integers. Instances
    compare and hash by identity, so cached arrays can key other caches.
    """

    images: np.ndarray
    labels: np.ndarray
    label_slugs: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> ImageArrays:
        return ImageArrays(self.images[idx], self.labels[idx], self.label_slugs)


def read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a uint8 array.

    The header is ``0x00 0x00 <dtype> <ndim>`` then ``ndim`` big-endian uint32 sizes.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, body has {body.size} bytes")
    return body.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (used to build test fixtures)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(
        ">" + "I" * arr.ndim, *arr.shape
    )
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header + arr.tobytes())


def resolve_fashion_mnist_dir(explicit: str | Path | None = None) -> Path:
    """Return the first folder holding all four files, or raise with how to fix it."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get(ENV_DIR):
        candidates.append(Path(os.environ[ENV_DIR]))
    candidates.append(DEBIAN_DIR)
    for folder in candidates:
        if all((folder / f).is_file() for pair in _FILES.values() for f in pair):
            return folder.resolve()
    if explicit or os.environ.get(ENV_DIR):
        looked = ", ".join(str(c) for c in candidates)
        raise DatasetNotFoundError(f"{_HOW_TO_GET} (looked in: {looked})")
    raise DatasetNotFoundError(_HOW_TO_GET)


def load_fashion_mnist(split: str, directory: str | Path | None = None) -> ImageArrays:
    """Load the ``train`` or ``test`` split as ``(N, 1, 28, 28)`` uint8 images."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = resolve_fashion_mnist_dir(directory)
    img_name, lbl_name = _FILES[split]
    images = read_idx(folder / img_name)
    labels = read_idx(folder / lbl_name).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return ImageArrays(images[:, None, :, :], labels, FASHION_MNIST_SLUGS)


def download_fashion_mnist(root: str | Path) -> Path:  # pragma: no cover - online only
    """Online fallback: fetch the IDX files with torchvision into ``root``.

    Never called by the app or the tests; for machines without the Debian package.
    """
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)
    return Path(root) / "FashionMNIST" / "raw"
