"""The artifact store: checkpoints and exported models behind ``pyarrow.fs``.

A local directory by default; any URI ``pyarrow.fs`` understands (``s3://…``,
``gs://…``, ``file:///…``) works the same, so a fleet can keep versions in object
storage without code changes. Writes are atomic (a temp object, then a move: rename
on a local disk), every artifact's SHA-256 is returned to be recorded with its version,
and reads verify it: a corrupted or swapped artifact is refused, never loaded.

Every process (the run, the CLI, the admin API) finds the registry the same way,
:func:`resolve_registry_root`: its own setting, else ``$FEDOBJ_REGISTRY_URI``, else
the outputs folder. An artifact's recorded URI can be opened again by any process:
it keeps the registry's non-secret connection options (``endpoint_override``,
``scheme``, ``region``, …) and never credentials, which ``pyarrow.fs`` takes from the
environment (``AWS_ACCESS_KEY_ID`` …). A URI under the registry this process uses is
read through that registry's filesystem, so versions recorded as a bare
``s3://bucket/key`` are found when the setting names their bucket and prefix.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fedobj.errors import FedObjError

if TYPE_CHECKING:
    from pyarrow import fs as pafs

    from fedobj.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

REGISTRY_ENV = "FEDOBJ_REGISTRY_URI"
"""The registry of every process whose own setting (run-config ``registry-uri``,
``--registry``) is empty."""

PUBLIC_OPTIONS = (
    "endpoint_override",
    "scheme",
    "region",
    "tls_ca_file_path",
    "tls_verify_certificates",
    "project_id",
    "retry_limit_seconds",
)
"""URI query options kept in recorded artifact URIs: where and how to connect,
nothing secret (S3 credentials in ``user:secret@`` are dropped, always)."""


def _fs() -> Any:
    """``pyarrow.fs``, imported on first use: a ClientApp imports this module
    (through ``fedobj.config``) but never opens a registry, and Flower starts a
    fresh ClientApp process for every message on a SuperNode (pyarrow: ~50 ms)."""
    from pyarrow import fs

    return fs


def _fs_errors() -> tuple[type[BaseException], ...]:
    """What ``pyarrow.fs`` raises: ``OSError`` for I/O, ``ArrowInvalid`` for bad
    URIs (a pyarrow error can only be raised once pyarrow is imported)."""
    import pyarrow as pa

    return (OSError, pa.ArrowException)


class ArtifactError(FedObjError):
    """An artifact is missing or its content does not match its recorded hash."""


class ArtifactWriteError(ArtifactError):
    """An artifact could not be written (full disk, no permission, store down);
    the message names the artifact and, for a local disk, the free space."""


@dataclass(frozen=True)
class Artifact:
    """Where an artifact lives and what it must hash to."""

    uri: str
    sha256: str
    size: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_registry_root(setting: str | Path | None, outputs_dir: str | Path) -> str:
    """The registry a process uses: ``setting`` (run-config ``registry-uri``, a
    ``--registry`` option), else ``$FEDOBJ_REGISTRY_URI``, else ``outputs_dir``.

    The one place this is decided, so the ServerApp, the CLI and the admin API
    agree when they are given the environment variable and nothing else.
    """
    return str(setting or os.environ.get(REGISTRY_ENV) or outputs_dir)


def public_uri(uri: str) -> str:
    """``uri`` without credentials: no ``user:secret@``, only :data:`PUBLIC_OPTIONS`."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k in PUBLIC_OPTIONS]
    text = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    return f"{text}?{urlencode(query, safe=':/')}" if query else text


def _location(uri: str) -> tuple[str, str]:
    """(scheme, path) of a URI or local path, the way two of them are compared."""
    if "://" not in uri:
        return "", str(Path(uri).expanduser().resolve())
    parts = urlsplit(uri)
    return parts.scheme, f"{parts.netloc.rpartition('@')[2]}{parts.path}".rstrip("/")


def _option(uri: str, name: str) -> str | None:
    return dict(parse_qsl(urlsplit(uri).query)).get(name) if "://" in uri else None


class ArtifactStore:
    """Artifacts under one root: a local folder or a ``pyarrow.fs`` URI."""

    def __init__(self, root: str | Path) -> None:
        root_str = str(root)
        self.public_root = public_uri(root_str)
        try:
            if "://" in root_str:
                self.fs, self.root = _fs().FileSystem.from_uri(root_str)
            else:
                self.fs = _fs().LocalFileSystem()
                self.root = str(Path(root_str).expanduser().resolve())
            self.fs.create_dir(self.root, recursive=True)
        except _fs_errors() as exc:
            raise ArtifactError(
                f"cannot open registry {self.public_root}: {_one_line(exc)}"
            ) from exc
        self._scheme, self._root_path = _location(root_str)
        self._endpoint = _option(root_str, "endpoint_override")
        query = self.public_root.partition("?")[2]
        self._query = f"?{query}" if query else ""

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in Path(key).parts:
            raise ValueError(
                f"artifact key must be relative and inside the store: {key}"
            )
        return f"{self.root.rstrip('/')}/{key}"

    def uri(self, key: str) -> str:
        """The URI recorded for ``key``: a local path, or a URI any process can
        open again (the registry's public options, no credentials)."""
        path = self._path(key)
        if not self._scheme:
            return path
        return f"{self.public_root.partition('?')[0].rstrip('/')}/{key}{self._query}"

    def holds(self, uri: str) -> bool:
        """Whether ``uri`` lies under this store's root (and endpoint, if it names
        one): such a URI is read through this store's filesystem and options."""
        scheme, path = _location(uri)
        if scheme != self._scheme:
            return False
        endpoint = _option(uri, "endpoint_override")
        if endpoint is not None and endpoint != self._endpoint:
            return False
        return path == self._root_path or path.startswith(self._root_path + "/")

    def _locate(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and path that hold ``uri``, wherever it was recorded."""
        if self.holds(uri):
            rest = _location(uri)[1][len(self._root_path) :]
            return self.fs, f"{self.root.rstrip('/')}{rest}"
        if "://" not in uri:
            return _fs().LocalFileSystem(), uri
        try:
            filesystem, path = _fs().FileSystem.from_uri(uri)
        except _fs_errors() as exc:
            raise self._elsewhere(uri, exc) from exc
        return filesystem, path

    def _elsewhere(self, uri: str, exc: BaseException) -> ArtifactError:
        return ArtifactError(
            f"artifact {public_uri(uri)} is outside this process's registry "
            f"({self.public_root}) and cannot be opened on its own "
            f"({_one_line(exc)}): set {REGISTRY_ENV} (or --registry, or run-config "
            "registry-uri) to the registry that holds it, with its options, e.g. "
            "s3://bucket/prefix?endpoint_override=host:port&scheme=http"
        )

    def _info(self, uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
        filesystem, path = self._locate(uri)
        try:
            return filesystem, path, filesystem.get_file_info(path)
        except _fs_errors() as exc:
            if self.holds(uri) or "://" not in uri:
                raise ArtifactError(
                    f"cannot read artifact {public_uri(uri)}: {_one_line(exc)}"
                ) from exc
            raise self._elsewhere(uri, exc) from exc

    def put_bytes(self, key: str, data: bytes, *, what: str = "artifact") -> Artifact:
        """Write ``data`` at ``key`` atomically; return its URI, hash and size.

        Raises
        ------
        ArtifactWriteError
            The write failed; nothing is left at ``key`` (nor a temp object), and
            the message names the file and, on a full local disk, its free space.
        """
        path = self._path(key)
        parent = path.rsplit("/", 1)[0]
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            try:
                self.fs.create_dir(parent, recursive=True)
                with self.fs.open_output_stream(tmp) as out:
                    out.write(data)
                self.fs.move(tmp, path)
            finally:
                self._discard(tmp)
        except _fs_errors() as exc:
            raise ArtifactWriteError(
                self._write_failure(what, key, len(data), exc)
            ) from exc
        return Artifact(self.uri(key), sha256_hex(data), len(data))

    def _discard(self, tmp: str) -> None:
        """Remove a temp object if a failed write left one (best effort: the
        write's own error is the one to report)."""
        try:
            if self.fs.get_file_info(tmp).type != _fs().FileType.NotFound:
                self.fs.delete_file(tmp)
        except _fs_errors() as exc:
            log.warning("could not remove temp artifact %s: %s", tmp, exc)

    def _write_failure(self, what: str, key: str, size: int, exc: BaseException) -> str:
        shown = f"{public_uri(self.uri(key))} ({size / 1e6:.1f} MB)"
        if getattr(exc, "errno", None) != errno.ENOSPC:
            return f"cannot write {what} {shown}: {_one_line(exc)}"
        if self._scheme not in ("", "file"):
            return f"cannot write {what} {shown}: no space left on device"
        free, mount = _free_space(Path(self._path(key)))
        return (
            f"cannot write {what} {shown}: no space left on device "
            f"({free / 1e6:.1f} MB free on {mount})"
        )

    def put_file(self, key: str, local_path: str | Path) -> Artifact:
        return self.put_bytes(key, Path(local_path).read_bytes())

    def read_verified(self, uri: str, sha256: str) -> bytes:
        """The artifact's bytes, if and only if they hash to ``sha256``."""
        filesystem, path, info = self._info(uri)
        if info.type != _fs().FileType.File:
            raise ArtifactError(f"artifact {public_uri(uri)} does not exist")
        try:
            with filesystem.open_input_stream(path) as src:
                data = bytes(src.read())
        except _fs_errors() as exc:
            raise ArtifactError(
                f"cannot read artifact {public_uri(uri)}: {_one_line(exc)}"
            ) from exc
        actual = sha256_hex(data)
        if actual != sha256:
            raise ArtifactError(
                f"artifact {public_uri(uri)} is corrupted or was replaced: sha256 "
                f"{actual[:12]}… != recorded {sha256[:12]}…; refusing to load it"
            )
        return data

    def delete(self, uri: str) -> None:
        filesystem, path, info = self._info(uri)
        if info.type != _fs().FileType.File:
            return
        try:
            filesystem.delete_file(path)
        except _fs_errors() as exc:
            raise ArtifactError(
                f"cannot delete artifact {public_uri(uri)}: {_one_line(exc)}"
            ) from exc

    def exists(self, uri: str) -> bool:
        return bool(self._info(uri)[2].type == _fs().FileType.File)

    def save_checkpoint(self, key: str, ckpt: Checkpoint) -> Artifact:
        # Imported here: checkpoints need torch, and serving an exported model
        # from this store must not import it (fedobj.inference is torch-free).
        from fedobj.model.checkpoint import checkpoint_to_bytes

        return self.put_bytes(key, checkpoint_to_bytes(ckpt), what="checkpoint")

    def load_checkpoint(self, uri: str, sha256: str) -> Checkpoint:
        """A verified checkpoint: ``.build()`` is the model, ``.class_map`` its rows."""
        from fedobj.model.checkpoint import checkpoint_from_bytes

        return checkpoint_from_bytes(self.read_verified(uri, sha256), uri)


def _free_space(path: Path) -> tuple[int, Path]:
    """Free bytes on the filesystem holding ``path``, and its mount point (the
    nearest existing parent is measured: the file itself may not exist)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    mount = existing
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return free, mount


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
