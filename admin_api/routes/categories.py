"""``/api/v1/categories``: what the federation can recognise."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.pagination import OffsetPagination
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from admin_api.auth import CATALOG_READ, READ, WRITE, allow
from admin_api.routes.common import CatalogDep, Limit, Offset, actor_of
from admin_api.schemas import (
    CategoryCreate,
    CategoryOut,
    CategoryStatsOut,
    CategoryUpdate,
    category_out,
    stats_out,
)

CategoryId = Annotated[
    str, Parameter(description="category id (UUID) or folder slug", max_length=255)
]


class CategoryController(Controller):
    path = "/categories"
    tags = ["categories"]

    @get("/", guards=[allow(*CATALOG_READ)])
    async def list_categories(
        self,
        catalog: CatalogDep,
        active: bool | None = None,
        q: Annotated[
            str | None, Parameter(max_length=255, description="name or slug contains")
        ] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> OffsetPagination[CategoryOut]:
        """Categories by class index; filter by ``active`` and a name search."""
        items = await catalog.list_categories(active, q, limit, offset)
        total = await catalog.count_categories(active, q)
        return OffsetPagination(
            items=[category_out(c) for c in items],
            limit=limit,
            offset=offset,
            total=total,
        )

    @post("/", guards=[allow(*WRITE)], status_code=HTTP_201_CREATED)
    async def create_category(
        self, catalog: CatalogDep, data: CategoryCreate, request: Request[Any, Any, Any]
    ) -> CategoryOut:
        """Add a category; the head grows by one row at the next round."""
        created = await catalog.add_category(
            data.name, data.description, actor=actor_of(request.user)
        )
        return category_out(created)

    @get("/{category_id:str}", guards=[allow(*READ)])
    async def get_category(
        self, catalog: CatalogDep, category_id: CategoryId
    ) -> CategoryOut:
        return category_out(await catalog.get_category(category_id))

    @patch("/{category_id:str}", guards=[allow(*WRITE)])
    async def update_category(
        self,
        catalog: CatalogDep,
        category_id: CategoryId,
        data: CategoryUpdate,
        request: Request[Any, Any, Any],
    ) -> CategoryOut:
        """Rename, re-describe or (de)activate; the slug and index stay."""
        updated = await catalog.update_category(
            category_id,
            name=data.name,
            description=data.description,
            is_active=data.is_active,
            actor=actor_of(request.user),
        )
        return category_out(updated)

    @delete("/{category_id:str}", guards=[allow(*WRITE)], status_code=HTTP_200_OK)
    async def delete_category(
        self,
        catalog: CatalogDep,
        category_id: CategoryId,
        request: Request[Any, Any, Any],
        hard: Annotated[
            bool,
            Parameter(
                description="remove the row; only for a category no version "
                "has trained on (409 otherwise)"
            ),
        ] = False,
    ) -> CategoryOut:
        """Deactivate (default) or, with ``hard=true``, delete a category.

        Deactivation masks the category in training and predictions from the next
        round on; its head row and index stay (contract 9).
        """
        actor = actor_of(request.user)
        if hard:
            gone = await catalog.get_category(category_id)
            await catalog.delete_category(category_id, actor=actor)
            return category_out(gone)
        return category_out(await catalog.deactivate_category(category_id, actor=actor))

    @get("/{category_id:str}/stats", guards=[allow(*READ)])
    async def category_stats(
        self, catalog: CatalogDep, category_id: CategoryId
    ) -> CategoryStatsOut:
        """Samples nodes reported, accuracy in the current version, versions."""
        return stats_out(await catalog.category_stats(category_id))
