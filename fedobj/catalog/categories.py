"""Categories: what the model can recognise, and which head row each one owns.

DESIGN.md contracts 1, 3, 8 and 9 live here: ``class_index`` comes from a counter
that survives deletes, so an index is never reused; a deactivated category keeps
its index and stays in every snapshot (masked, not removed); a category that any
version has trained on cannot be deleted.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from piccolo.columns.combination import WhereRaw
from piccolo.custom_types import Combinable

from fedobj.catalog._base import CatalogBase, finite_or_none, guarded
from fedobj.catalog.cache import cached_read
from fedobj.catalog.db import is_unique_violation
from fedobj.catalog.errors import (
    CatalogValueError,
    CategoryInUseError,
    DuplicateCategoryError,
    InvalidCategoryError,
    NotFoundError,
)
from fedobj.catalog.records import (
    CategoryRecord,
    CategoryStats,
    category_from_row,
    json_value,
)
from fedobj.catalog.tables import NAME_MAX
from fedobj.classmap import ClassEntry, ClassMap
from fedobj.data.categories import FASHION_MNIST_NAMES, slugify

CategoryKey = uuid.UUID | str | int
"""A category's id, slug, display name (any case) or ``class_index``."""


def clean_name(name: str) -> tuple[str, str, str]:
    """``(display name, case-folded key, slug)`` for a proposed category name.

    Raises
    ------
    InvalidCategoryError
        The trimmed name is empty, longer than 255 characters, holds control
        characters, or has no letter or digit to build a folder name from.
    """
    display = name.strip()
    if not display:
        raise InvalidCategoryError("category name must not be empty")
    bad = [c for c in display if unicodedata.category(c) in ("Cc", "Cs")]
    if bad:
        raise InvalidCategoryError(
            f"category name has control or surrogate characters: {bad[:3]!r}"
        )
    if len(display) > NAME_MAX:
        raise InvalidCategoryError(
            f"category name is {len(display)} characters; at most {NAME_MAX}"
        )
    try:
        slug = slugify(display)
    except ValueError as exc:
        raise InvalidCategoryError(str(exc)) from exc
    return display, display.casefold(), slug[:NAME_MAX]


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class CategoryOps(CatalogBase):
    """Category operations of :class:`fedobj.catalog.Catalog`."""

    @guarded
    async def add_category(
        self, name: str, description: str = "", *, actor: str | None = None
    ) -> CategoryRecord:
        """Create a category with the next never-used ``class_index``.

        ``actor`` (an API key id, ``cli:<user>``) leaves an audit row in the same
        transaction; every admin write below takes it too.

        Raises
        ------
        InvalidCategoryError
            The name is empty, too long, or cannot become a slug.
        DuplicateCategoryError
            The name (case-insensitively) or its slug is taken.
        """
        display, key, slug = clean_name(name)
        t = self.tables.Category
        async with self._write():
            await self._refuse_duplicate(key, slug)
            index = await self._next_number("class_index")
            # A database filled by other means may be ahead of its counter.
            top = (
                await t.select(t.class_index)
                .order_by(t.class_index, ascending=False)
                .first()
            )
            if top is not None and int(top["class_index"]) >= index:
                index = int(top["class_index"]) + 1
                c = self.tables.Counter
                await c.update({c.value: index + 1}).where(c.name == "class_index")
            now = self.clock()
            row = t(
                id=uuid.uuid4(),
                name=display,
                name_key=key,
                slug=slug,
                description=description,
                class_index=index,
                is_active=True,
                sample_count=0,
                created_at=now,
                updated_at=now,
            )
            try:
                await t.insert(row)
            except Exception as exc:
                if is_unique_violation(exc):
                    raise DuplicateCategoryError(
                        f"category {display!r} (slug {slug!r}) already exists"
                    ) from exc
                raise
            await self._audit(
                actor,
                "category.create",
                str(row.id),
                {"name": display, "slug": slug, "class_index": index},
            )
        return await self.get_category(row.id)

    async def _refuse_duplicate(
        self, key: str, slug: str | None, exclude: uuid.UUID | None = None
    ) -> None:
        t = self.tables.Category
        clash: Combinable = t.name_key == key
        if slug is not None:
            clash = clash | (t.slug == slug)
        query = t.select(t.name, t.slug).where(clash)
        if exclude is not None:
            query = query.where(t.id != exclude)
        for row in await query:
            if row["slug"] == slug and row["name"].casefold() != key:
                raise DuplicateCategoryError(
                    f"slug {slug!r} is already used by category {row['name']!r}"
                )
            raise DuplicateCategoryError(f"category {row['name']!r} already exists")

    @guarded
    @cached_read
    async def list_categories(
        self,
        active: bool | None = None,
        search: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CategoryRecord]:
        """Categories ordered by ``class_index``.

        Parameters
        ----------
        active
            ``True``/``False`` to keep only active/inactive ones; ``None``: all.
        search
            Case-insensitive substring of the name or the slug.
        """
        t = self.tables.Category
        query = t.select().order_by(t.class_index).limit(limit).offset(offset)
        for clause in self._filters(active, search):
            query = query.where(clause)
        return [category_from_row(r) for r in await query]

    @guarded
    @cached_read
    async def count_categories(
        self, active: bool | None = None, search: str | None = None
    ) -> int:
        """How many categories :meth:`list_categories` would page through."""
        t = self.tables.Category
        query = t.count()
        for clause in self._filters(active, search):
            query = query.where(clause)
        return int(await query)

    def _filters(self, active: bool | None, search: str | None) -> list[Any]:
        t = self.tables.Category
        clauses: list[Any] = []
        if active is not None:
            clauses.append(t.is_active == active)
        if search:
            pattern = _like_pattern(search.strip().casefold())
            clauses.append(
                WhereRaw(
                    "(name_key LIKE {} ESCAPE '\\' OR slug LIKE {} ESCAPE '\\')",
                    pattern,
                    pattern,
                )
            )
        return clauses

    @guarded
    async def get_category(self, key: CategoryKey) -> CategoryRecord:
        """One category by id, ``class_index``, slug or display name.

        Raises
        ------
        NotFoundError
            Nothing matches ``key``.
        """
        return category_from_row(await self._category_row(key))

    async def _category_row(self, key: CategoryKey) -> dict[str, Any]:
        t = self.tables.Category
        if isinstance(key, bool):
            raise CatalogValueError(f"not a category id, slug or index: {key!r}")
        clause: Combinable
        if isinstance(key, int):
            clause = t.class_index == key
        elif isinstance(key, uuid.UUID):
            clause = t.id == key
        else:
            try:
                clause = t.id == uuid.UUID(key)
            except ValueError:
                text = key.strip()
                clause = (t.slug == text) | (t.name_key == text.casefold())
        row = await t.select().where(clause).first()
        if row is None:
            raise NotFoundError(f"no category {key!r}")
        return dict(row)

    @guarded
    async def update_category(
        self,
        key: CategoryKey,
        *,
        name: str | None = None,
        description: str | None = None,
        is_active: bool | None = None,
        actor: str | None = None,
    ) -> CategoryRecord:
        """Rename, re-describe, (de)activate a category; index and slug stay.

        The slug is the folder name on every device and is baked into every class
        map, so renaming "Sneaker" to "Sneakers" keeps the slug ``sneaker``.

        Raises
        ------
        NotFoundError, InvalidCategoryError, DuplicateCategoryError
        """
        t = self.tables.Category
        async with self._write():
            row = await self._category_row(key)
            values: dict[Any, Any] = {t.updated_at: self.clock()}
            if name is not None:
                display, name_key, _ = clean_name(name)
                await self._refuse_duplicate(name_key, None, exclude=row["id"])
                values[t.name] = display
                values[t.name_key] = name_key
            if description is not None:
                values[t.description] = description
            if is_active is not None:
                values[t.is_active] = bool(is_active)
            try:
                await t.update(values).where(t.id == row["id"])
            except Exception as exc:
                if is_unique_violation(exc):
                    raise DuplicateCategoryError(f"{name!r} already exists") from exc
                raise
            changes = {
                k: v
                for k, v in (
                    ("name", name),
                    ("description", description),
                    ("is_active", is_active),
                )
                if v is not None
            }
            await self._audit(actor, "category.update", str(row["id"]), changes)
        return await self.get_category(row["id"])

    async def deactivate_category(
        self, key: CategoryKey, *, actor: str | None = None
    ) -> CategoryRecord:
        """Mask a category from now on; its index and head row stay (contract 9)."""
        return await self.update_category(key, is_active=False, actor=actor)

    @guarded
    async def delete_category(
        self, key: CategoryKey, *, actor: str | None = None
    ) -> None:
        """Hard-delete a category that no model version has ever included.

        Its ``class_index`` is still never handed out again.

        Raises
        ------
        NotFoundError
            No such category.
        CategoryInUseError
            A version's class map contains its index: deactivate it instead.
        """
        t = self.tables.Category
        v = self.tables.ModelVersion
        async with self._write():
            # Keep a version that includes this index from being registered
            # between our check and our delete (SQLite: BEGIN IMMEDIATE does it).
            await self._lock("model_version", "SHARE")
            row = await self._category_row(key)
            index = int(row["class_index"])
            maps = await v.select(v.name, v.class_map).where(v.num_classes > index)
            for version in maps:
                entries = json_value(version["class_map"]) or []
                if any(int(e["index"]) == index for e in entries):
                    raise CategoryInUseError(
                        f"category {row['name']!r} (index {index}) is in the class "
                        f"map of version {version['name']!r}; deactivate it instead"
                    )
            await t.delete().where(t.id == row["id"])
            await self._audit(
                actor,
                "category.delete",
                str(row["id"]),
                {"name": row["name"], "class_index": index},
            )

    @guarded
    async def category_stats(self, key: CategoryKey) -> CategoryStats:
        """Samples reported, accuracy in the current version, versions including it.

        A version "includes" a category when its class map has the category's
        index; the per-class accuracy is the current version's
        ``class-<index>-accuracy`` metric (centralised evaluation), if it has one.
        """
        category = category_from_row(await self._category_row(key))
        index = category.class_index
        v = self.tables.ModelVersion
        rows = (
            await v.select(v.name, v.class_map, v.is_current, v.metrics)
            .where(v.num_classes > index)
            .order_by(v.number)
            .output(load_json=True)
        )
        names: list[str] = []
        current: str | None = None
        accuracy: float | None = None
        for r in rows:
            entries = json_value(r["class_map"]) or []
            if not any(int(e["index"]) == index for e in entries):
                continue
            names.append(r["name"])
            if r["is_current"]:
                current = r["name"]
                metrics = json_value(r["metrics"]) or {}
                accuracy = finite_or_none(metrics.get(f"class-{index}-accuracy"))
        return CategoryStats(
            category=category,
            samples_reported=category.sample_count,
            current_version=current,
            current_accuracy=accuracy,
            versions_including=len(names),
            version_names=names,
        )

    @guarded
    @cached_read
    async def snapshot(self) -> ClassMap:
        """The class map of every category ever kept, active or not (contract 3).

        Head row ``i`` is the category with ``class_index == i``; the map may have
        gaps where a never-trained category was deleted, and its ``num_classes`` is
        ``max(index) + 1``.
        """
        t = self.tables.Category
        rows = await t.select(t.class_index, t.slug, t.name, t.is_active)
        return ClassMap(
            tuple(
                ClassEntry(
                    int(r["class_index"]), r["slug"], r["name"], bool(r["is_active"])
                )
                for r in rows
            )
        )

    @guarded
    async def seed_categories(
        self, names: Iterable[str] = FASHION_MNIST_NAMES
    ) -> list[CategoryRecord]:
        """Create the named categories that do not exist yet, in order.

        On an empty catalog the default gives Fashion-MNIST's ten categories at
        indices 0..9 (its label order); running it again changes nothing.
        """
        out = []
        async with self._write():
            for name in names:
                _, key, _ = clean_name(name)
                t = self.tables.Category
                existing = await t.select().where(t.name_key == key).first()
                if existing is not None:
                    out.append(category_from_row(existing))
                else:
                    out.append(await self.add_category(name))
        return out

    @guarded
    async def add_sample_counts(self, histogram: Mapping[str, int]) -> dict[str, int]:
        """Add images nodes reported per slug; return the slugs the catalog lacks.

        Raises
        ------
        CatalogValueError
            A count is negative.
        """
        t = self.tables.Category
        unknown: dict[str, int] = {}
        async with self._write():
            for slug, count in histogram.items():
                if int(count) < 0:
                    raise CatalogValueError(f"negative sample count for {slug!r}")
                rows = (
                    await t.update({t.sample_count: t.sample_count + int(count)})
                    .where(t.slug == slug)
                    .returning(t.slug)
                )
                if not rows:
                    unknown[slug] = int(count)
        return unknown
