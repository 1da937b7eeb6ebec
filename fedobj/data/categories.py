"""Category names and their folder slugs (DESIGN.md contract 8).

A category has a display ``name`` ("T-shirt/top") and a ``slug`` ("t-shirt-top"): the
slug is the folder name a device stores its images under, so it must be filesystem-safe
and stable; the name is what people read.
"""

from __future__ import annotations

import re
import unicodedata

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
