"""``/health``, ``/api/v1/audit`` and ``/metrics``."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.pagination import OffsetPagination
from litestar.params import Parameter
from litestar.plugins.prometheus import PrometheusController

from admin_api.auth import READ, WRITE, allow
from admin_api.metrics import set_current_version
from admin_api.routes.common import CatalogDep, Limit, Offset
from admin_api.schemas import AuditOut, Health, audit_out


@get("/health", tags=["system"], exclude_from_auth=True)
async def health(catalog: CatalogDep) -> Health:
    """Liveness and readiness: 200 when the catalog answers, 503 otherwise
    (a problem+json naming the database)."""
    current = await catalog.current_version()
    return Health(
        status="ok",
        database=catalog.spec.kind,
        current_version=current.name if current else None,
    )


class AuditController(Controller):
    path = "/audit"
    tags = ["audit"]

    @get("/", guards=[allow(*WRITE)])
    async def list_audit(
        self,
        catalog: CatalogDep,
        action: Annotated[
            str | None, Parameter(max_length=64, description="e.g. category.create")
        ] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> OffsetPagination[AuditOut]:
        """Admin writes, newest first: who (key id), what, on what, when."""
        items = await catalog.list_audit(action=action, limit=limit, offset=offset)
        return OffsetPagination(
            items=[audit_out(a) for a in items],
            limit=limit,
            offset=offset,
            total=await catalog.count_audit(action=action),
        )


class MetricsController(PrometheusController):
    """Prometheus text format; needs a viewer or admin key like other reads."""

    path = "/metrics"
    guards = [allow(*READ)]
    include_in_schema = False


async def refresh_version_gauge(catalog: CatalogDep) -> None:
    """Point the served-version gauge at the current version (at start-up)."""
    current = await catalog.current_version()
    set_current_version(current.name if current else None)


__all__ = [
    "AuditController",
    "MetricsController",
    "health",
    "refresh_version_gauge",
]
