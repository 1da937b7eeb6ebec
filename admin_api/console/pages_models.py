"""The catalog and the model versions: list, add, edit, deactivate, delete,
roll back, download — each action the API's own catalog call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from litestar import Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException
from litestar.params import Body, Parameter
from litestar.response import Redirect, Stream, Template

from admin_api.auth import READ, WRITE
from admin_api.console.auth import is_htmx, require
from admin_api.console.render import page
from admin_api.console.views import class_rows, confusion
from admin_api.routes.common import CatalogDep, ServerDep, actor_of
from admin_api.routes.versions import download_stream
from fedobj.catalog import Catalog, CatalogValueError, ConflictError
from fedobj.serving import DOWNLOAD_FORMATS

Slug = Annotated[str, Parameter(max_length=255)]
PAGE = 50


@dataclass
class CategoryForm:
    name: str = ""
    description: str = ""
    is_active: str = ""  # a checkbox: "on" when ticked, absent otherwise
    updated_at: str = ""  # what the form was made from (stale-form check)


Form = Annotated[CategoryForm, Body(media_type=RequestEncodingType.URL_ENCODED)]


async def _max_trained_classes(catalog: Catalog) -> int:
    """Head rows of the widest version: a category below it has been trained on
    (indices are never reused), so only the API's 409 could follow a delete."""
    rows = await catalog.tables.ModelVersion.raw(
        "SELECT COALESCE(MAX(num_classes), 0) AS n FROM model_version"
    )
    return int(rows[0]["n"] or 0)


async def _catalog_context(
    catalog: Catalog, q: str | None, active: bool | None, offset: int
) -> dict[str, Any]:
    items = await catalog.list_categories(active, q or None, PAGE, offset)
    total = await catalog.count_categories(active, q or None)
    current = await catalog.current_version()
    accuracy: dict[int, float] = {}
    if current is not None:
        accuracy = {
            r.index: r.accuracy for r in class_rows(current) if r.accuracy is not None
        }
    return {
        "items": items,
        "total": total,
        "q": q or "",
        "active": "" if active is None else ("true" if active else "false"),
        "offset": offset,
        "page_size": PAGE,
        "accuracy": accuracy,
        "current": current,
        "trained_below": await _max_trained_classes(catalog),
    }


@get("/catalog")
async def catalog_page(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    q: Annotated[str | None, Parameter(max_length=255)] = None,
    active: Literal["", "true", "false"] = "",
    offset: Annotated[int, Parameter(ge=0, le=10**9)] = 0,
) -> Template:
    """Search and filter; htmx asks for the table alone as the person types."""
    require(request, *READ)
    shown = None if active == "" else active == "true"
    context = await _catalog_context(catalog, q, shown, offset)
    if is_htmx(request) and request.headers.get("hx-target") == "category-table":
        return page(request, "_category_table.html", **context)
    return page(request, "catalog.html", form={}, errors={}, **context)


@post("/catalog", status_code=303)
async def add_category(
    request: Request[Any, Any, Any], catalog: CatalogDep, data: Form
) -> Response[Any]:
    """Add a category; a refusal (duplicate, control characters) is shown next
    to the name field."""
    who = require(request, *WRITE)
    try:
        created = await catalog.add_category(
            data.name, data.description, actor=actor_of(who)
        )
    except (CatalogValueError, ConflictError) as exc:
        status = 409 if isinstance(exc, ConflictError) else 422
        form = {"name": data.name, "description": data.description}
        errors = {"name": str(exc)}
        if is_htmx(request):
            return page(
                request,
                "_category_add.html",
                status_code=status,
                form=form,
                errors=errors,
            )
        context = await _catalog_context(catalog, None, None, 0)
        return page(
            request,
            "catalog.html",
            status_code=status,
            form=form,
            errors=errors,
            **context,
        )
    if is_htmx(request):
        return page(
            request,
            "_category_add.html",
            status_code=201,
            headers={"HX-Trigger": "catalog-changed"},
            form={},
            errors={},
            added=created,
        )
    return Redirect("/catalog", status_code=303)


@get("/catalog/{slug:str}/edit")
async def edit_category_page(
    request: Request[Any, Any, Any], catalog: CatalogDep, slug: Slug
) -> Template:
    require(request, *WRITE)
    category = await catalog.get_category(slug)
    return page(request, "category_edit.html", c=category, errors={}, form=None)


@post("/catalog/{slug:str}", status_code=303)
async def edit_category(
    request: Request[Any, Any, Any], catalog: CatalogDep, slug: Slug, data: Form
) -> Response[Any]:
    """Rename, re-describe, (de)activate. A form made before someone else
    changed the category is refused rather than silently overwriting them."""
    who = require(request, *WRITE)
    category = await catalog.get_category(slug)
    errors: dict[str, str] = {}
    status = 409
    if data.updated_at and data.updated_at != category.updated_at.isoformat():
        errors["form"] = (
            "This category was changed by someone else after you opened the form; "
            "its current values are shown — check them and save again."
        )
    else:
        try:
            await catalog.update_category(
                slug,
                name=data.name if data.name != category.name else None,
                description=data.description,
                is_active=data.is_active == "on",
                actor=actor_of(who),
            )
            return Redirect(f"/catalog?q={category.slug}", status_code=303)
        except (CatalogValueError, ConflictError) as exc:
            errors["name"] = str(exc)
            status = 409 if isinstance(exc, ConflictError) else 422
    fresh = await catalog.get_category(slug)
    return page(
        request,
        "category_edit.html",
        status_code=status,
        c=fresh,
        errors=errors,
        form=data if "form" not in errors else None,
    )


@post("/catalog/{slug:str}/deactivate", status_code=303)
async def deactivate_category(
    request: Request[Any, Any, Any], catalog: CatalogDep, slug: Slug
) -> Response[Any]:
    who = require(request, *WRITE)
    await catalog.deactivate_category(slug, actor=actor_of(who))
    return Redirect("/catalog", status_code=303)


@post("/catalog/{slug:str}/delete", status_code=303)
async def delete_category(
    request: Request[Any, Any, Any], catalog: CatalogDep, slug: Slug
) -> Response[Any]:
    """Hard delete: only a category no version trained on (else the API's 409)."""
    who = require(request, *WRITE)
    await catalog.delete_category(slug, actor=actor_of(who))
    return Redirect("/catalog", status_code=303)


@get("/versions")
async def versions_page(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    offset: Annotated[int, Parameter(ge=0, le=10**9)] = 0,
) -> Template:
    require(request, *READ)
    items = await catalog.list_versions(limit=PAGE, offset=offset)
    return page(
        request,
        "versions.html",
        items=items,
        total=await catalog.count_versions(),
        offset=offset,
        page_size=PAGE,
    )


@get("/versions/{name:str}")
async def version_page(
    request: Request[Any, Any, Any], catalog: CatalogDep, name: Slug
) -> Template:
    require(request, *READ)
    version = await catalog.get_version(name)
    labels, matrix = confusion(version)
    return page(
        request,
        "version.html",
        v=version,
        classes=class_rows(version),
        labels=labels,
        matrix=matrix,
        formats=DOWNLOAD_FORMATS,
    )


@post("/versions/{name:str}/rollback", status_code=303)
async def rollback(
    request: Request[Any, Any, Any], catalog: CatalogDep, name: Slug
) -> Response[Any]:
    """Make this version current: the next round and ``/detect`` use it."""
    who = require(request, *WRITE)
    moved = await catalog.set_current(name, actor=actor_of(who))
    return Redirect(f"/versions/{moved.name}", status_code=303)


@get("/versions/{name:str}/download/{fmt:str}")
async def download(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    model_server: ServerDep,
    name: Slug,
    fmt: Slug,
) -> Stream:
    """The API's download (exported on first request, hash-verified)."""
    require(request, *READ)
    if fmt not in DOWNLOAD_FORMATS:
        raise HTTPException(
            status_code=400, detail=f"unknown format {fmt!r}: {DOWNLOAD_FORMATS}"
        )
    version = await catalog.get_version(name)
    return await download_stream(model_server, version, fmt)


HANDLERS = [
    catalog_page,
    add_category,
    edit_category_page,
    edit_category,
    deactivate_category,
    delete_category,
    versions_page,
    version_page,
    rollback,
    download,
]
