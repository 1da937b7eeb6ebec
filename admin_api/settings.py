"""What the admin API is configured with, and where each value comes from.

Defaults put everything where a run puts it: the catalog at
``$FEDOBJ_OUTPUTS_DIR/catalog.db`` (or ``$FEDOBJ_DATABASE_URL``), the registry at
``$FEDOBJ_REGISTRY_URI`` (else in ``$FEDOBJ_OUTPUTS_DIR``), the API secret beside
them. So ``make demo`` followed by ``fedobj admin serve`` serves the demo's versions
with no flags at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedobj.errors import ConfigError
from fedobj.registry import resolve_registry_root

MB = 1024 * 1024


def default_outputs_dir() -> Path:
    """``$FEDOBJ_OUTPUTS_DIR``, else ``./outputs`` (what ``flwr run`` uses)."""
    return Path(os.environ.get("FEDOBJ_OUTPUTS_DIR", "outputs")).resolve()


@dataclass(frozen=True)
class ApiSettings:
    """Admin API settings.

    Attributes
    ----------
    database_url
        Catalog database; empty: ``$FEDOBJ_DATABASE_URL``, else
        ``<outputs_dir>/catalog.db``.
    registry_uri
        Artifact store root (a folder or a ``pyarrow.fs`` URI); empty:
        ``$FEDOBJ_REGISTRY_URI``, else ``outputs_dir`` (the rule every process
        follows: :func:`fedobj.registry.resolve_registry_root`).
    secret_file
        Server secret for API-key hashes (``$FEDOBJ_API_SECRET`` wins).
    rate_limit_per_second
        Requests per second per client address; 0 turns rate limiting off (the
        load benchmark does).
    max_image_bytes
        Largest image ``/detect`` accepts (413 beyond).
    max_batch_images
        Most images one ``/detect/batch`` request may carry; the request-body
        limit of that route is this many maximal images.
    detect_threshold
        Default confidence for ``detected`` (overridable per request).
    cors_origins
        Allowed CORS origins; empty: CORS off.
    inference_threads
        ONNX Runtime intra-op threads per model.
    key_cache_seconds
        How long a verified key is trusted before the database is asked again
        (a revocation through another process takes effect within this).
    """

    outputs_dir: Path = field(default_factory=default_outputs_dir)
    database_url: str = ""
    registry_uri: str = ""
    secret_file: Path | None = None
    rate_limit_per_second: int = 100
    max_image_bytes: int = 10 * MB
    max_batch_images: int = 16
    detect_threshold: float = 0.7
    cors_origins: tuple[str, ...] = ()
    inference_threads: int = 1
    key_cache_seconds: float = 1.0
    max_page: int = 200

    def __post_init__(self) -> None:
        if self.rate_limit_per_second < 0:
            raise ConfigError("rate_limit_per_second must be >= 0")
        if self.max_image_bytes < 1024:
            raise ConfigError("max_image_bytes must be >= 1024")
        if self.max_batch_images < 1:
            raise ConfigError("max_batch_images must be >= 1")
        if not 0.0 <= self.detect_threshold <= 1.0:
            raise ConfigError("detect_threshold must be in [0, 1]")
        if self.inference_threads < 1:
            raise ConfigError("inference_threads must be >= 1")

    @property
    def catalog_url(self) -> str | None:
        """The URL to open, or None to let ``$FEDOBJ_DATABASE_URL`` decide."""
        return self.database_url or None

    @property
    def catalog_default_path(self) -> Path:
        return self.outputs_dir / "catalog.db"

    @property
    def registry_root(self) -> str:
        return resolve_registry_root(self.registry_uri, self.outputs_dir)

    @property
    def secret_path(self) -> Path:
        return self.secret_file or self.outputs_dir / "api-secret"

    @property
    def detect_body_limit(self) -> int:
        """Body limit of ``/detect``: one maximal image plus multipart framing."""
        return self.max_image_bytes + 64 * 1024

    @property
    def batch_body_limit(self) -> int:
        """Body limit of ``/detect/batch``: ``max_batch_images`` maximal images."""
        return self.max_batch_images * self.max_image_bytes + 64 * 1024
