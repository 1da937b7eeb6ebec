"""A confusion matrix that travels inside a version's metrics.

Version metrics are a flat ``name -> number`` mapping (Flower's MetricRecord,
the registry's JSON), so the matrix is stored as its non-zero cells,
``confusion-<true>-<predicted>``: a 10-class model's few dozen cells, not 100
keys, and no new column or artifact to keep in step with the version.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREFIX = "confusion-"
_KEY = re.compile(r"^confusion-(\d+)-(\d+)$")


def confusion_metrics(cells: Mapping[tuple[int, int], int]) -> dict[str, float]:
    """``{(true, predicted): count}`` as metric entries (zero cells left out)."""
    return {f"{PREFIX}{t}-{p}": float(n) for (t, p), n in sorted(cells.items()) if n}


def confusion_from_metrics(
    metrics: Mapping[str, object],
) -> tuple[list[int], list[list[int]]]:
    """The class indices seen and the square matrix over them (rows: true).

    Empty lists when the version has no matrix (an older version, or no
    centralised evaluation).
    """
    cells: dict[tuple[int, int], int] = {}
    for key, value in metrics.items():
        match = _KEY.match(key)
        if match and isinstance(value, (int, float)):
            cells[(int(match.group(1)), int(match.group(2)))] = int(value)
    classes = sorted({c for pair in cells for c in pair})
    pos = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for (t, p), n in cells.items():
        matrix[pos[t]][pos[p]] = n
    return classes, matrix
