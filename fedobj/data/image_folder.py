"""Image folders as devices hold them: ``DIR/<category-slug>/<image file>``.

Real folders hold surprises (a ``.DS_Store``, a truncated JPEG, a PDF); each is
skipped and counted with its reason, never allowed to crash a round. Prepared arrays
can be cached on disk because a SuperNode starts a fresh ClientApp process for every
message: decoding the same JPEGs every round would dominate its time. The cache is
a plain ``.npy`` opened memory-mapped: a message's process reads only the pages
it indexes, straight from the page cache the device's earlier messages left, with
no copy of the whole folder's pixels per message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedobj.data.fashion_mnist import ImageArrays
from fedobj.errors import DatasetNotFoundError, EmptyDatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


@dataclass
class FolderReport:
    """What a scan found: usable images per category, every file skipped and why."""

    root: Path
    counts: Counter[str] = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def skip_reasons(self) -> Counter[str]:
        return Counter(reason.split(":")[0] for _, reason in self.skipped)

    def warn_skipped(self, logger: logging.Logger, where: str) -> None:
        """Log one warning naming how many files were skipped and why, if any."""
        if self.skipped:
            logger.warning(
                "%s: skipped %d files (%s)",
                where,
                len(self.skipped),
                dict(self.skip_reasons()),
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _candidate_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` with its category folder ("" if outside any)."""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist or is not a directory"
        )
    files: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            files.append(("", entry))
        elif entry.is_dir() and not entry.name.startswith("."):
            files.extend(
                (entry.name, f) for f in sorted(entry.rglob("*")) if f.is_file()
            )
    return files


def _skip_reason(slug: str, path: Path) -> str | None:
    """Why a file cannot be a training image before opening it, or None."""
    if not slug:
        return "outside any category folder"
    if path.name.startswith("."):
        return "hidden file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image: suffix {path.suffix or '(none)'}"
    return None


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


def _decode(path: Path, channels: int, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        mode = "L" if channels == 1 else "RGB"
        resized = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(resized, dtype=np.uint8)
    return arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: str | Path,
    channels: int = 1,
    size: int = 28,
    cache_dir: str | Path | None = None,
) -> tuple[ImageArrays, FolderReport]:
    """Decode every usable image under ``root`` to uint8 ``(N, channels, size, size)``.

    Labels index ``label_slugs`` (the sub-folder names, sorted). Raises
    :class:`EmptyDatasetError` when no image is usable, with the skip reasons.
    """
    root = Path(root).expanduser().resolve()
    files = _candidate_files(root)
    cache_file = _cache_path(root, files, channels, size, cache_dir)
    if cache_file is not None and cache_file.is_file():
        return _read_cache(cache_file, root)

    report = FolderReport(root)
    images: list[np.ndarray] = []
    slugs: list[str] = []
    for slug, path in files:
        rel = str(path.relative_to(root))
        reason = _skip_reason(slug, path)
        if reason:
            report.skipped.append((rel, reason))
            continue
        try:
            images.append(_decode(path, channels, size))
        except _DECODE_ERRORS as exc:
            report.skipped.append((rel, f"unreadable: {exc}"))
            continue
        slugs.append(slug)
        report.counts[slug] += 1
    if not images:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skip_reasons().items())
        raise EmptyDatasetError(
            f"no usable images under {root} (expected {root}/<category-slug>/*.jpg|png"
            f"|webp|bmp; skipped: {reasons or 'nothing found'})"
        )
    label_slugs = tuple(sorted(set(slugs)))
    lookup = {s: i for i, s in enumerate(label_slugs)}
    data = ImageArrays(
        np.stack(images),
        np.array([lookup[s] for s in slugs], dtype=np.int64),
        label_slugs,
    )
    if cache_file is not None:
        _write_cache(cache_file, data, report)
    return data, report


def check_image_folder(root: str | Path) -> FolderReport:
    """Scan without keeping pixels: what ``fedobj data check DIR`` reports."""
    root = Path(root).expanduser().resolve()
    report = FolderReport(root)
    for slug, path in _candidate_files(root):
        rel = str(path.relative_to(root))
        reason = _skip_reason(slug, path)
        if reason is None:
            try:
                with Image.open(path) as img:
                    img.load()  # verify() misses truncated pixel data
            except _DECODE_ERRORS as exc:
                reason = f"unreadable: {exc}"
        if reason:
            report.skipped.append((rel, reason))
        else:
            report.counts[slug] += 1
    return report


def _cache_path(
    root: Path,
    files: list[tuple[str, Path]],
    channels: int,
    size: int,
    cache_dir: str | Path | None,
) -> Path | None:
    """The cache entry's manifest (``imagefolder-<key>.json``), or None.

    The key hashes every file's path, size and mtime, plus the decode settings:
    any change to the folder makes a new entry. Beside the manifest lie
    ``<key>.images.npy`` and ``<key>.labels.npy``.
    """
    if cache_dir is None:
        return None
    h = hashlib.sha256(f"{root}|{channels}|{size}".encode())
    for _, f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return Path(cache_dir) / f"imagefolder-{h.hexdigest()[:24]}.json"


def _arrays_of(manifest: Path) -> tuple[Path, Path]:
    stem = manifest.with_suffix("")
    return stem.with_suffix(".images.npy"), stem.with_suffix(".labels.npy")


def _write_cache(path: Path, data: ImageArrays, report: FolderReport) -> None:
    """Arrays first, the manifest last: a manifest means a complete entry (each
    file is written under a temporary name and renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    for dest, array in zip(_arrays_of(path), (data.images, data.labels), strict=True):
        tmp = dest.with_name(dest.name + tag)
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
        tmp.replace(dest)
    meta = {"slugs": list(data.label_slugs), "report": report.to_dict()}
    tmp = path.with_name(path.name + tag)
    tmp.write_text(json.dumps(meta))
    tmp.replace(path)
    log.info("cached %d prepared images at %s", len(data), path)


def _read_cache(path: Path, root: Path) -> tuple[ImageArrays, FolderReport]:
    meta = json.loads(path.read_text())
    images_file, labels_file = _arrays_of(path)
    data = ImageArrays(
        np.load(images_file, mmap_mode="r"),  # read-only: subsets are copies
        np.load(labels_file),
        tuple(meta["slugs"]),
    )
    rep = meta["report"]
    report = FolderReport(
        root, Counter(rep["counts"]), [(s["path"], s["reason"]) for s in rep["skipped"]]
    )
    return data, report
