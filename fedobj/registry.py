"""The artifact store: checkpoints and exported models behind ``pyarrow.fs``.

A local directory by default; any URI ``pyarrow.fs`` understands (``s3://…``,
``gs://…``, ``file:///…``) works the same, so a fleet can keep versions in object
storage without code changes. Writes are atomic (a temp object, then a move: rename
on a local disk), every artifact's SHA-256 is returned to be recorded with its version,
and reads verify it: a corrupted or swapped artifact is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyarrow import fs as pafs

from fedobj.errors import FedObjError

if TYPE_CHECKING:
    from fedobj.model.checkpoint import Checkpoint


class ArtifactError(FedObjError):
    """An artifact is missing or its content does not match its recorded hash."""


@dataclass(frozen=True)
class Artifact:
    """Where an artifact lives and what it must hash to."""

    uri: str
    sha256: str
    size: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Artifacts under one root: a local folder or a ``pyarrow.fs`` URI."""

    def __init__(self, root: str | Path) -> None:
        root_str = str(root)
        if "://" in root_str:
            self.fs, self.root = pafs.FileSystem.from_uri(root_str)
            self._scheme = root_str.split("://", 1)[0]
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(root_str).expanduser().resolve())
            self._scheme = ""
        self.fs.create_dir(self.root, recursive=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in Path(key).parts:
            raise ValueError(
                f"artifact key must be relative and inside the store: {key}"
            )
        return f"{self.root.rstrip('/')}/{key}"

    def uri(self, key: str) -> str:
        path = self._path(key)
        return f"{self._scheme}://{path}" if self._scheme else path

    def _path_of_uri(self, uri: str) -> str:
        if self._scheme and uri.startswith(f"{self._scheme}://"):
            return uri.split("://", 1)[1]
        return uri

    def put_bytes(self, key: str, data: bytes) -> Artifact:
        """Write ``data`` at ``key`` atomically; return its URI, hash and size."""
        path = self._path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
        return Artifact(self.uri(key), sha256_hex(data), len(data))

    def put_file(self, key: str, local_path: str | Path) -> Artifact:
        return self.put_bytes(key, Path(local_path).read_bytes())

    def read_verified(self, uri: str, sha256: str) -> bytes:
        """The artifact's bytes, if and only if they hash to ``sha256``."""
        path = self._path_of_uri(uri)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise ArtifactError(f"artifact {uri} does not exist")
        with self.fs.open_input_stream(path) as src:
            data = bytes(src.read())
        actual = sha256_hex(data)
        if actual != sha256:
            raise ArtifactError(
                f"artifact {uri} is corrupted or was replaced: sha256 {actual[:12]}… "
                f"!= recorded {sha256[:12]}…; refusing to load it"
            )
        return data

    def delete(self, uri: str) -> None:
        path = self._path_of_uri(uri)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)

    def exists(self, uri: str) -> bool:
        info = self.fs.get_file_info(self._path_of_uri(uri))
        return bool(info.type == pafs.FileType.File)

    def save_checkpoint(self, key: str, ckpt: Checkpoint) -> Artifact:
        # Imported here: checkpoints need torch, and serving an exported model
        # from this store must not import it (fedobj.inference is torch-free).
        from fedobj.model.checkpoint import checkpoint_to_bytes

        return self.put_bytes(key, checkpoint_to_bytes(ckpt))

    def load_checkpoint(self, uri: str, sha256: str) -> Checkpoint:
        """A verified checkpoint: ``.build()`` is the model, ``.class_map`` its rows."""
        from fedobj.model.checkpoint import checkpoint_from_bytes

        return checkpoint_from_bytes(self.read_verified(uri, sha256), uri)
