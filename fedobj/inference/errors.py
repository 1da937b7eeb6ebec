"""What serving raises. Both are :class:`~fedobj.errors.FedObjError`, so the API
maps them to HTTP statuses in one place and the CLI to one red line."""

from __future__ import annotations

from fedobj.errors import FedObjError


class InferenceError(FedObjError):
    """A model cannot be served or a prediction request cannot be answered."""


class ImageInputError(InferenceError, ValueError):
    """Uploaded bytes are not a usable image; the message says why, for a person."""
