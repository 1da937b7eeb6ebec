"""Serving registry versions: their artifacts (exported on demand) and predictions.

The admin API, the CLI and benchmarks share this instead of each loading models
their own way. A version's ONNX artifact is made the first time anything asks for
it (the same :mod:`fedobj.export` code ``fedobj export`` runs), stored in the
registry next to its checkpoint and recorded on the version row; later requests
read it back, hash-verified. Predictors are cached per (version, artifact hash),
and callers pass the version they want each time, so a rollback or a new current
version is served from the very next request.

Exporting imports torch, so it happens in a worker thread, and only when an
artifact is missing; serving an existing artifact needs onnxruntime only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from fedobj.catalog import Catalog, VersionRecord
from fedobj.errors import FedObjError
from fedobj.inference import Predictor, PredictorCache
from fedobj.registry import ArtifactStore, sha256_hex

log = logging.getLogger(__name__)

_EXPORT_LOCK = threading.Lock()
"""torch's ONNX exporter keeps global state: one export at a time per process."""

DOWNLOAD_FORMATS: tuple[str, ...] = ("checkpoint", "onnx", "onnx-int8")
"""What ``/versions/{id}/download`` and ``fedobj export`` can hand out."""

ARTIFACT_NAMES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


class NoModelError(FedObjError):
    """There is no current version to serve yet."""


class UnknownFormatError(FedObjError, ValueError):
    """A download format we do not make."""


@dataclass(frozen=True)
class ArtifactBytes:
    """A verified artifact's content and identity."""

    fmt: str
    data: bytes
    sha256: str
    filename: str


class ModelServer:
    """Artifacts and predictors of registry versions, for one process.

    Parameters
    ----------
    catalog
        The async catalog (versions are read and artifacts recorded there).
    store
        The registry holding checkpoints and exports.
    cache_size
        Predictors kept in memory (least recently used dropped first).
    threads
        ONNX Runtime intra-op threads per predictor.
    """

    def __init__(
        self,
        catalog: Catalog,
        store: ArtifactStore,
        *,
        cache_size: int = 4,
        threads: int = 1,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.threads = threads
        self.cache = PredictorCache(max_size=cache_size, threads=threads)
        self._export_locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def current(self) -> VersionRecord:
        """The current version, or :class:`NoModelError` when there is none."""
        version = await self.catalog.current_version()
        if version is None:
            raise NoModelError(
                "no model version yet: run a federation (`make demo`) first"
            )
        return version

    async def artifact(self, version: VersionRecord, fmt: str) -> ArtifactBytes:
        """A version's artifact in ``fmt``, exported and recorded if missing.

        Raises
        ------
        UnknownFormatError
            ``fmt`` is not one of :data:`DOWNLOAD_FORMATS`.
        fedobj.registry.ArtifactError
            The stored bytes do not match the recorded hash (refused).
        fedobj.export.ExportError
            The export failed or did not pass its parity check.
        """
        if fmt not in DOWNLOAD_FORMATS:
            raise UnknownFormatError(
                f"format must be one of {DOWNLOAD_FORMATS}, got {fmt!r}"
            )
        if fmt == "checkpoint":
            data = await asyncio.to_thread(
                self.store.read_verified,
                version.checkpoint_uri,
                version.checkpoint_sha256,
            )
            return ArtifactBytes(fmt, data, version.checkpoint_sha256, "model.pt")
        lock = self._export_locks.setdefault((str(version.id), fmt), asyncio.Lock())
        async with lock:  # one export per version and format, however many ask
            fresh = await self.catalog.get_version(version.id)
            entry = fresh.artifacts.get(fmt)
            if entry is None:
                entry = await self._export(fresh, fmt)
            data = await asyncio.to_thread(
                self.store.read_verified, str(entry["uri"]), str(entry["sha256"])
            )
        return ArtifactBytes(fmt, data, str(entry["sha256"]), ARTIFACT_NAMES[fmt])

    async def _export(self, version: VersionRecord, fmt: str) -> dict[str, object]:
        from fedobj.export import ExportResult, calibration_images, export_artifact

        log.info("exporting version %s to %s (first request for it)", version.name, fmt)
        ckpt = await asyncio.to_thread(
            self.store.load_checkpoint,
            version.checkpoint_uri,
            version.checkpoint_sha256,
        )
        calibration = await asyncio.to_thread(
            calibration_images, ckpt.model_args.image_size, ckpt.model_args.in_channels
        )

        def run_export() -> ExportResult:
            with _EXPORT_LOCK:
                return export_artifact(
                    ckpt, fmt, version_name=version.name, calibration=calibration
                )

        result = await asyncio.to_thread(run_export)
        stored = await asyncio.to_thread(
            self.store.put_bytes,
            f"versions/{version.name}/{ARTIFACT_NAMES[fmt]}",
            result.data,
        )
        parity = result.parity
        await self.catalog.record_artifact(
            version.id,
            fmt,
            uri=stored.uri,
            sha256=stored.sha256,
            size=stored.size,
            extra={
                "parity": {
                    "max_abs_diff": parity.max_abs_diff,
                    "top1_agreement": parity.top1_agreement,
                    "n": parity.n,
                    "rule": parity.rule,
                }
            },
        )
        return {"uri": stored.uri, "sha256": stored.sha256, "size": stored.size}

    async def predictor(self, version: VersionRecord) -> Predictor:
        """The fp32 ONNX predictor of ``version`` (exported on first use)."""
        entry = version.artifacts.get("onnx")
        if entry is not None:
            key = (str(version.id), str(entry["sha256"]))
            cached = self.cache.peek(key)
            if cached is not None:
                return cached
        art = await self.artifact(version, "onnx")
        key = (str(version.id), art.sha256)
        return await asyncio.to_thread(
            self.cache.get, key, lambda: art.data, version_name=version.name
        )


async def detect(
    server: ModelServer,
    images: list[bytes],
    *,
    top_k: int = 5,
    threshold: float = 0.7,
    version: VersionRecord | None = None,
) -> tuple[VersionRecord, list[dict[str, Any]]]:
    """Classify ``images`` with ``version`` (default: the current one).

    Returns the version used and one response-shaped dict per image (see
    :meth:`fedobj.inference.Detection.to_dict`). Decoding and the model run
    happen in a worker thread, so an event loop keeps serving meanwhile.

    Raises
    ------
    NoModelError
        No current version.
    fedobj.inference.ImageInputError
        An image cannot be decoded (the message says which and why).
    """
    if version is None:
        version = await server.current()
    predictor = await server.predictor(version)
    allowed = await allowed_classes(server.catalog, version)
    detections = await asyncio.to_thread(
        predictor.predict_bytes,
        images,
        top_k=top_k,
        threshold=threshold,
        allowed=allowed,
    )
    return version, [d.to_dict() for d in detections]


async def allowed_classes(catalog: Catalog, version: VersionRecord) -> list[int]:
    """Head rows a prediction may name: in the version's map and active now.

    A category deactivated after the version was trained is never predicted
    (contract 9), and one added after it is not in its head at all.
    """
    active_now = set((await catalog.snapshot()).active_indices)
    return [i for i in version.class_map.active_indices if i in active_now]


def image_digest(data: bytes) -> str:
    """The hash the detection history keeps instead of the image."""
    return sha256_hex(data)
