"""Hot catalog reads from memory, revalidated by the database's change counter.

The admin API answers the category list, the current version and the class map
(which every ``/detect`` needs) far more often than they change. A serving
process turns the cache on with :meth:`fedobj.catalog.Catalog.cache_reads`; each
cached read then costs one tiny query, "what is the change counter?", and
recomputes only when the counter moved. Triggers bump the counter in every
transaction that writes a category or a model version, whichever process runs
it (the round loop, the CLI, another API worker), so a read never returns rows
older than the last write committed before it began: no staleness window.

A read inside a write transaction bypasses the cache (it must see its own
uncommitted rows). Cached records are frozen dataclasses shared between callers;
lists are copied on the way out.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

MAX_ENTRIES = 512
"""Distinct cached calls per counter value (search strings and pages are keys);
past it the cache starts over rather than growing without bound."""


class ReadCache:
    """Results of read calls, valid while the change counter stays the same."""

    def __init__(
        self, counter: Callable[[], Awaitable[int]], max_entries: int = MAX_ENTRIES
    ) -> None:
        self._counter = counter
        self._max_entries = max_entries
        self._seen: int | None = None
        self._entries: dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[R]]) -> R:
        """The cached result for ``key``, recomputed when the catalog changed.

        The counter is read *before* the rows: a write landing in between makes
        the cached rows newer than the counter says, never older, and the next
        call sees the new counter and reads again.
        """
        seen = await self._counter()
        if seen != self._seen:
            self._entries.clear()
            self._seen = seen
        if key in self._entries:
            self.hits += 1
            value: R = self._entries[key]
        else:
            self.misses += 1
            value = await compute()
            if self._seen == seen:  # another call may have moved on meanwhile
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()
                self._entries[key] = value
        return list(value) if isinstance(value, list) else value  # type: ignore[return-value]


class _Cached(Protocol):
    _read_cache: ReadCache | None
    engine: Any


S = TypeVar("S", bound=_Cached)


def cached_read(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """Serve ``fn`` from the catalog's :class:`ReadCache` when one is on.

    Arguments become the cache key, so they must be hashable (they are: flags,
    search strings, page bounds).
    """

    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        cache = self._read_cache
        if cache is None or self.engine.current_transaction.get() is not None:
            return await fn(self, *args, **kwargs)
        key = (fn.__name__, args, tuple(sorted(kwargs.items())))
        return await cache.get(key, lambda: fn(self, *args, **kwargs))

    return wrapper
