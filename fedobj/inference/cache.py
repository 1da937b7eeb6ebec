"""Loaded predictors kept by key, so a request never waits for a model that is
already in memory, and a new current version is picked up by the next request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from fedobj.inference.predictor import Predictor


class PredictorCache:
    """Predictors by key, e.g. ``(version id, artifact sha256)``, at most ``max_size``.

    Callers pass the version they want on every request, so a new current version
    (or a rollback) is picked up by the very next one; the least recently used
    predictor is dropped. Building happens outside the cache's lock (a new version
    takes a second to load and must not stall requests for the cached ones), and
    once per key however many threads ask for it at the same time.
    """

    def __init__(self, max_size: int = 4, *, threads: int = 1) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.threads = threads
        self._items: OrderedDict[Hashable, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}

    def get(
        self,
        key: Hashable,
        load: Callable[[], bytes | Predictor],
        *,
        version_name: str | None = None,
    ) -> Predictor:
        """The cached predictor for ``key``, built from ``load()`` on first use.

        ``load`` returns the ONNX bytes (built with this cache's ``threads`` and
        ``version_name``) or a ready :class:`Predictor`.
        """
        cached = self.peek(key)
        if cached is not None:
            return cached
        with self._lock:
            key_lock = self._building.setdefault(key, threading.Lock())
        try:
            with key_lock:
                cached = self.peek(key)  # another thread built it while we waited
                if cached is not None:
                    return cached
                loaded = load()
                predictor = (
                    loaded
                    if isinstance(loaded, Predictor)
                    else Predictor.from_bytes(
                        loaded, version_name, threads=self.threads
                    )
                )
                with self._lock:
                    self._items[key] = predictor
                    while len(self._items) > self.max_size:
                        self._items.popitem(last=False)
                return predictor
        finally:
            with self._lock:
                self._building.pop(key, None)

    def peek(self, key: Hashable) -> Predictor | None:
        """The cached predictor for ``key`` (marked recently used), or None."""
        with self._lock:
            predictor = self._items.get(key)
            if predictor is not None:
                self._items.move_to_end(key)
            return predictor

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
