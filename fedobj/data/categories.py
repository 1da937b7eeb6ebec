"""Category names and their folder slugs (DESIGN.md contract 8).

A category has a display ``name`` ("T-shirt/top") and a ``slug`` ("t-shirt-top"): the
slug is the folder name a device stores its images under, so it must be filesystem-safe
and stable; the name is what people read.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from fedobj.classmap import ClassMap

_NON_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(name: str) -> str:
    """Lower-case ASCII, runs of anything else collapsed to one ``-``.

    >>> slugify("T-shirt/top")
    't-shirt-top'
    >>> slugify("  Ankle boot ")
    'ankle-boot'
    """
    ascii_name = (
        unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    )
    slug = _NON_SLUG.sub("-", ascii_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"category name {name!r} has no letters or digits for a slug")
    return slug


# Fashion-MNIST's label order (label i in the IDX files is the i-th name).
FASHION_MNIST_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FASHION_MNIST_SLUGS: tuple[str, ...] = tuple(slugify(n) for n in FASHION_MNIST_NAMES)


def fashion_mnist_class_map() -> ClassMap:
    """The default catalog: Fashion-MNIST's ten categories at indices 0..9."""
    return ClassMap.from_names(zip(FASHION_MNIST_NAMES, FASHION_MNIST_SLUGS))


@dataclass(frozen=True)
class FolderMatch:
    """How a device's category folders meet a catalog's class map.

    Training takes a folder's images only when its name is the slug of an active
    category (``fedobj.train.map_to_class_map``); the others are skipped every
    round, so a device's owner should see them before a run, not in its logs.
    """

    known: dict[str, int]  # folder -> its category's head row
    inactive: tuple[str, ...]  # folders of deactivated categories
    unknown: dict[str, str | None]  # folder -> the catalog slug it may mean


def match_folders(folders: Iterable[str], class_map: ClassMap) -> FolderMatch:
    """Sort ``folders`` into known, inactive and unknown categories of
    ``class_map``; an unknown folder whose name slugifies to a category's slug
    (``Ankle Boot`` for ``ankle-boot``) names that slug."""
    by_slug = {e.slug: e for e in class_map.entries}
    known: dict[str, int] = {}
    inactive: list[str] = []
    unknown: dict[str, str | None] = {}
    for folder in sorted(folders):
        entry = by_slug.get(folder)
        if entry is None:
            try:
                meant: str | None = slugify(folder)
            except ValueError:  # no letters or digits
                meant = None
            unknown[folder] = meant if meant in by_slug else None
        elif entry.active:
            known[folder] = entry.index
        else:
            inactive.append(folder)
    return FolderMatch(known, tuple(inactive), unknown)
