"""Serving registry versions: their artifacts (exported on demand) and predictions.

The admin API, the CLI and benchmarks share this instead of each loading models
their own way. A version's ONNX artifact is made the first time anything asks for
it (the same :mod:`fedobj.export` code ``fedobj export`` runs), stored in the
registry next to its checkpoint and recorded on the version row; later requests
read it back, hash-verified. Predictors are cached per (version, artifact hash),
and callers pass the version they want each time, so a rollback or a new current
version is served from the very next request.

Two edge artifacts, two rules. The *mobile* artifact (``ort``: INT8, ORT format)
is judged by size and agreement and only handed out. The *server* artifact is what
:meth:`ModelServer.predictor` serves: the fastest of the candidates on this
machine (fp32 ONNX, INT8 QDQ), measured by :meth:`ModelServer.choose_server_artifact`
and recorded on the version as its ``server`` artifact entry; until a choice is
recorded, the fp32 ONNX file is served. fp32 is always a candidate and wins ties,
so the server artifact is never slower than plain ONNX Runtime fp32 as measured.

Exporting imports torch, so it happens in a worker thread, and only when an
artifact is missing; serving an existing artifact needs onnxruntime only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import threading
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from fedobj.catalog import Catalog, VersionRecord
from fedobj.classmap import ClassMap
from fedobj.errors import FedObjError
from fedobj.inference import Predictor, PredictorCache, measure_latency
from fedobj.registry import ArtifactStore, public_uri, sha256_hex

log = logging.getLogger(__name__)

_EXPORT_LOCK = threading.Lock()
"""torch's ONNX exporter keeps global state: one export at a time per process."""

DOWNLOAD_FORMATS: tuple[str, ...] = ("checkpoint", "onnx", "onnx-int8", "ort")
"""What ``/versions/{id}/download`` and ``fedobj export`` can hand out."""

ARTIFACT_NAMES = {
    "onnx": "model.onnx",
    "onnx-int8": "model.int8.onnx",
    "ort": "model.ort",
}
SERVER = "server"
"""The version's ``artifacts`` entry naming the server artifact (a copy of the
chosen format's uri/sha256/size, plus the measurements behind the choice)."""
SERVER_CANDIDATES: tuple[str, ...] = ("onnx", "onnx-int8")
# Another candidate must beat fp32 by this much to be chosen: a 2-core machine's
# medians wobble by a few percent, and fp32 is the exact one.
SERVER_MARGIN = 0.05


class NoModelError(FedObjError):
    """There is no current version to serve yet."""


class UnknownFormatError(FedObjError, ValueError):
    """A download format we do not make."""


@dataclass(frozen=True)
class ServerChoice:
    """The server artifact chosen for a version, and why (ms, medians)."""

    fmt: str
    sha256: str
    latency_ms: dict[str, dict[str, float]]  # format -> {"batch1": ms, "batch8": ms}
    host: str
    threads: int


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
    choose_server
        Measure and record the server artifact on the first prediction with a
        version that has none recorded for this host (seconds, once per version);
        off: serve the recorded choice, else fp32 ONNX.
    """

    def __init__(
        self,
        catalog: Catalog,
        store: ArtifactStore,
        *,
        cache_size: int = 4,
        threads: int = 1,
        choose_server: bool = False,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.threads = threads
        self.choose_server = choose_server
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
        if not self.store.holds(version.checkpoint_uri):
            log.warning(
                "version %s was trained into another registry (%s); its %s export "
                "goes to this process's registry %s: give every process the same "
                "registry setting (FEDOBJ_REGISTRY_URI) to keep them together",
                version.name,
                public_uri(version.checkpoint_uri),
                fmt,
                self.store.public_root,
            )
        stored = await asyncio.to_thread(
            self.store.put_bytes,
            f"versions/{version.name}/{ARTIFACT_NAMES[fmt]}",
            result.data,
            what=f"{fmt} export",
        )
        extra: dict[str, Any] = {"parity": _parity_dict(result.parity)}
        if len(result.steps) > 1:
            extra["steps"] = {k: _parity_dict(r) for k, r in result.steps.items()}
        if fmt == "ort":
            from fedobj.export import MOBILE_SIZE_BUDGET, MOBILE_TARGET

            extra["target_platform"] = MOBILE_TARGET
            extra["size_budget"] = MOBILE_SIZE_BUDGET.get(ckpt.model_args.name)
        await self.catalog.record_artifact(
            version.id,
            fmt,
            uri=stored.uri,
            sha256=stored.sha256,
            size=stored.size,
            extra=extra,
        )
        return {"uri": stored.uri, "sha256": stored.sha256, "size": stored.size}

    async def choose_server_artifact(
        self,
        version: VersionRecord,
        *,
        candidates: tuple[str, ...] = SERVER_CANDIDATES,
        repeats: int = 30,
    ) -> ServerChoice:
        """Measure the candidates on this machine; record and return the fastest.

        Each candidate is exported if missing (INT8 is skipped, with a log line,
        when no calibration images exist here), then timed at batch 1 and 8 with
        this server's threads, round-robin so drift hits all alike. The winner
        is the lowest batch-1 median; a candidate other than fp32 ``onnx`` must
        beat it by :data:`SERVER_MARGIN`. Recorded as the version's ``server``
        artifact entry, which :meth:`predictor` serves from then on.
        """
        from fedobj.export import ExportError

        if "onnx" not in candidates:
            candidates = ("onnx", *candidates)
        arts: dict[str, ArtifactBytes] = {}
        for fmt in candidates:
            try:
                arts[fmt] = await self.artifact(version, fmt)
            except ExportError as exc:
                if fmt == "onnx":
                    raise
                log.warning("server candidate %s left out: %s", fmt, exc)
        latency = await asyncio.to_thread(_measure, arts, self.threads, repeats)
        fp32 = latency["onnx"]["batch1"]
        best = min(latency, key=lambda f: latency[f]["batch1"])
        if best != "onnx" and latency[best]["batch1"] > fp32 * (1 - SERVER_MARGIN):
            best = "onnx"
        chosen = arts[best]
        entry = (await self.catalog.get_version(version.id)).artifacts[best]
        host = socket.gethostname()
        await self.catalog.record_artifact(
            version.id,
            SERVER,
            uri=str(entry["uri"]),
            sha256=chosen.sha256,
            size=len(chosen.data),
            extra={
                "format": best,
                "latency_ms": latency,
                "host": host,
                "machine": f"{platform.machine()} {_cpu_name()}".strip(),
                "cpus": os.cpu_count(),
                "threads": self.threads,
                "onnxruntime": ort.__version__,
                "rule": f"fastest batch-1 median; others must beat onnx by "
                f"{SERVER_MARGIN:.0%}",
            },
        )
        log.info(
            "server artifact of %s: %s (batch-1 ms: %s)",
            version.name,
            best,
            {f: round(v["batch1"], 3) for f, v in latency.items()},
        )
        return ServerChoice(best, chosen.sha256, latency, host, self.threads)

    async def server_artifact(self, version: VersionRecord) -> ArtifactBytes:
        """The artifact :meth:`predictor` serves: the recorded server choice, else
        fp32 ONNX (exported if missing). Hash-verified either way."""
        entry = version.artifacts.get(SERVER)
        if entry is None:
            return await self.artifact(version, "onnx")
        fmt = str(entry.get("format", "onnx"))
        data = await asyncio.to_thread(
            self.store.read_verified, str(entry["uri"]), str(entry["sha256"])
        )
        return ArtifactBytes(
            fmt, data, str(entry["sha256"]), ARTIFACT_NAMES.get(fmt, "model.onnx")
        )

    async def predictor(self, version: VersionRecord) -> Predictor:
        """The predictor of ``version``'s :meth:`server_artifact`."""
        entry = version.artifacts.get(SERVER)
        if self.choose_server and (
            entry is None or entry.get("host") != socket.gethostname()
        ):
            lock = self._export_locks.setdefault(
                (str(version.id), SERVER), asyncio.Lock()
            )
            async with lock:
                version = await self.catalog.get_version(version.id)
                entry = version.artifacts.get(SERVER)
                if entry is None or entry.get("host") != socket.gethostname():
                    await self.choose_server_artifact(version)
                    version = await self.catalog.get_version(version.id)
                    entry = version.artifacts.get(SERVER)
        if entry is None:
            entry = version.artifacts.get("onnx")
        if entry is not None:
            key = (str(version.id), str(entry["sha256"]))
            cached = self.cache.peek(key)
            if cached is not None:
                return cached
        art = await self.server_artifact(version)
        key = (str(version.id), art.sha256)
        return await asyncio.to_thread(
            self.cache.get, key, lambda: art.data, version_name=version.name
        )


def _parity_dict(report: Any) -> dict[str, Any]:
    return {
        "max_abs_diff": report.max_abs_diff,
        "top1_agreement": report.top1_agreement,
        "n": report.n,
        "rule": report.rule,
    }


def _measure(
    arts: dict[str, ArtifactBytes], threads: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Batch-1 and batch-8 medians (ms) per format, measured round-robin."""
    predictors = {
        fmt: Predictor.from_bytes(a.data, threads=threads) for fmt, a in arts.items()
    }
    runs: dict[str, dict[str, list[float]]] = {
        fmt: {"batch1": [], "batch8": []} for fmt in predictors
    }
    rounds = 3
    for _ in range(rounds):
        for fmt, p in predictors.items():
            runs[fmt]["batch1"].append(measure_latency(p, 1, repeats=repeats))
            runs[fmt]["batch8"].append(
                measure_latency(p, 8, repeats=max(1, repeats // 4))
            )
    return {
        fmt: {k: round(sorted(v)[len(v) // 2], 4) for k, v in by_batch.items()}
        for fmt, by_batch in runs.items()
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
    current, classes_now = await server.catalog.serving_view()
    if version is None:
        if current is None:
            raise NoModelError(
                "no model version yet: run a federation (`make demo`) first"
            )
        version = current
    predictor = await server.predictor(version)
    allowed = allowed_classes(classes_now, version)
    detections = await asyncio.to_thread(
        predictor.predict_bytes,
        images,
        top_k=top_k,
        threshold=threshold,
        allowed=allowed,
    )
    return version, [d.to_dict() for d in detections]


def allowed_classes(classes_now: ClassMap, version: VersionRecord) -> list[int]:
    """Head rows a prediction may name: in the version's map and active now.

    A category deactivated after the version was trained is never predicted
    (contract 9), and one added after it is not in its head at all.
    """
    active_now = set(classes_now.active_indices)
    return [i for i in version.class_map.active_indices if i in active_now]


def image_digest(data: bytes) -> str:
    """The hash the detection history keeps instead of the image."""
    return sha256_hex(data)
