"""What a device keeps on its own disk between rounds for the edge link.

- the **residual** of top-k (error feedback): what it did not send, added to its
  next update so nothing is lost over rounds;
- the **held model**: the last model it received, against which the server may
  send the next one as an int8 delta (``downlink-compression=int8``).

Both are kept per device id, like the DP ledger (``fedobj.privacy``), under
``<cache-dir>/link/``; a simulated device's under ``runs/<scope>/`` so that one
simulated federation never inherits another's residuals. A ClientApp process is
started afresh for every message on a SuperNode: memory would not survive.

A residual survives head growth: tensors are kept by name, and a head that
gained rows keeps its old rows' residual (new rows start at zero). Files are
written atomically (a killed process leaves the old one whole).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedobj.compression.layout import Layout

log = logging.getLogger("fedobj.compression")

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ID_KEY = "__held_model_id__"


class DeviceStateError(ValueError):
    """A device's link state file exists but cannot be read."""


def state_folder(cache_dir: str | Path, scope: str | None) -> Path:
    folder = Path(cache_dir) / "link"
    if scope is not None:
        folder = folder / "runs" / _SAFE.sub("_", scope.strip())
    return folder


def _path(cache_dir: str | Path, device: str, scope: str | None, kind: str) -> Path:
    return state_folder(cache_dir, scope) / f"{_SAFE.sub('_', device)}.{kind}.npz"


def _write(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **dict(arrays))  # type: ignore[arg-type]
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DeviceStateError(f"link state {path} is unreadable ({exc})") from exc


def _fit(old: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``old`` in ``shape`` if it is the same or a head that gained rows."""
    if old.shape == shape:
        return old
    grown = old.ndim == len(shape) and old.shape[1:] == shape[1:]
    if grown and old.shape[0] < shape[0]:
        out = np.zeros(shape, old.dtype)
        out[: old.shape[0]] = old
        return out
    return None


def load_residual(
    cache_dir: str | Path, device: str, scope: str | None, layout: Layout
) -> np.ndarray:
    """The device's residual as a flat float32 vector in ``layout`` (zeros if
    it has none); tensors that no longer fit are dropped, and said so."""
    saved = _read(_path(cache_dir, device, scope, "residual"))
    flat = np.zeros(layout.size, np.float32)
    if saved is None:
        return flat
    for name, shape, off, size in zip(
        layout.names, layout.shapes, layout.offsets, layout.sizes
    ):
        old = saved.get(name)
        if old is None:
            continue
        fitted = _fit(old, shape)
        if fitted is None:
            log.warning(
                "residual of %s dropped: shape %s no longer fits %s",
                name,
                old.shape,
                shape,
            )
            continue
        flat[off : off + size] = fitted.reshape(-1)
    return flat


def save_residual(
    cache_dir: str | Path,
    device: str,
    scope: str | None,
    layout: Layout,
    flat: np.ndarray,
) -> None:
    """Keep ``flat`` as the device's residual, tensor by tensor."""
    arrays = {
        name: np.asarray(flat[off : off + size], np.float32).reshape(shape)
        for name, shape, off, size in zip(
            layout.names, layout.shapes, layout.offsets, layout.sizes
        )
    }
    _write(_path(cache_dir, device, scope, "residual"), arrays)


def load_held(
    cache_dir: str | Path, device: str, scope: str | None
) -> tuple[str, dict[str, np.ndarray]] | None:
    """``(model id, arrays)`` of the last model the device received, if kept."""
    saved = _read(_path(cache_dir, device, scope, "held"))
    if saved is None or _ID_KEY not in saved:
        return None
    model_id = str(saved.pop(_ID_KEY))
    return model_id, saved


def save_held(
    cache_dir: str | Path,
    device: str,
    scope: str | None,
    model_id: str,
    arrays: Mapping[str, np.ndarray],
) -> None:
    """Keep ``arrays`` as the model the device holds, named ``model_id``."""
    _write(
        _path(cache_dir, device, scope, "held"),
        {**arrays, _ID_KEY: np.array(model_id)},
    )
