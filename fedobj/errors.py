"""Domain exceptions.

Everything in ``fedobj`` raises one of these; the CLI turns them into one clear line,
the admin API into an HTTP status, and the ServerApp into a log line before round 1.
"""


class FedObjError(Exception):
    """Base class for every error fedobj raises on purpose."""


class ConfigError(FedObjError, ValueError):
    """A run-config or node-config value is invalid; the message names the key."""


class DatasetNotFoundError(FedObjError, FileNotFoundError):
    """The data a node or the server needs is not where it was told to look."""


class EmptyDatasetError(FedObjError, ValueError):
    """A dataset was found but holds no usable image."""


class ClassMapError(FedObjError, ValueError):
    """A class map is malformed (duplicate index or slug, negative index)."""


class CheckpointError(FedObjError, ValueError):
    """A checkpoint cannot be loaded (unknown format version, missing fields)."""
