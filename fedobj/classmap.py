"""The class map: which head row means which category (DESIGN.md contracts 1 and 2).

It travels with every model (in checkpoints and in every train/evaluate message), so a
client never has to guess what row ``i`` of the head means. Row ``i`` is always the
category whose ``class_index`` is ``i``; indices are never reused, so the map may have
gaps, and the head has ``max(index) + 1`` rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedobj.errors import ClassMapError


@dataclass(frozen=True)
class ClassEntry:
    """One category as the model sees it."""

    index: int
    slug: str
    name: str
    active: bool = True


@dataclass(frozen=True)
class ClassMap:
    """An immutable, validated mapping between head rows and category slugs."""

    entries: tuple[ClassEntry, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        seen_idx: set[int] = set()
        seen_slug: set[str] = set()
        for e in self.entries:
            if e.index < 0:
                raise ClassMapError(f"class index must be >= 0, got {e.index}")
            if e.index in seen_idx:
                raise ClassMapError(f"class index {e.index} appears twice")
            if e.slug in seen_slug:
                raise ClassMapError(f"slug {e.slug!r} appears twice")
            seen_idx.add(e.index)
            seen_slug.add(e.slug)
        ordered = tuple(sorted(self.entries, key=lambda e: e.index))
        object.__setattr__(self, "entries", ordered)

    @classmethod
    def from_names(cls, names: Iterable[tuple[str, str]]) -> ClassMap:
        """Build a dense map from ``(name, slug)`` pairs, indices in order."""
        return cls(
            tuple(ClassEntry(i, slug, name) for i, (name, slug) in enumerate(names))
        )

    @property
    def num_classes(self) -> int:
        """Rows the head needs: ``max(index) + 1`` (0 for an empty map)."""
        return max((e.index for e in self.entries), default=-1) + 1

    @property
    def active_indices(self) -> list[int]:
        return [e.index for e in self.entries if e.active]

    @property
    def slug_to_index(self) -> dict[str, int]:
        return {e.slug: e.index for e in self.entries}

    def names_by_index(self) -> dict[int, str]:
        return {e.index: e.name for e in self.entries}

    def to_json(self) -> str:
        """Compact JSON used in ConfigRecords and checkpoints."""
        return json.dumps(
            [[e.index, e.slug, e.name, e.active] for e in self.entries],
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ClassMap:
        try:
            rows = json.loads(text)
            return cls(
                tuple(
                    ClassEntry(int(i), str(s), str(n), bool(a)) for i, s, n, a in rows
                )
            )
        except (ValueError, TypeError) as exc:
            raise ClassMapError(f"malformed class map: {exc}") from exc

    def to_dict(self) -> list[dict[str, object]]:
        return [
            {"index": e.index, "slug": e.slug, "name": e.name, "active": e.active}
            for e in self.entries
        ]

    @classmethod
    def from_dict(cls, rows: Iterable[Mapping[str, object]]) -> ClassMap:
        return cls(
            tuple(
                ClassEntry(
                    int(str(r["index"])),
                    str(r["slug"]),
                    str(r["name"]),
                    bool(r.get("active", True)),
                )
                for r in rows
            )
        )
