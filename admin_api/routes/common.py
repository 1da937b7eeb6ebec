"""Parameters and dependencies every controller shares."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import Parameter

from admin_api.auth import Principal
from admin_api.detection_log import DetectionLog
from fedobj.catalog import Catalog
from fedobj.serving import ModelServer

MAX_PAGE = 200
MAX_OFFSET = 10**9  # beyond int64 the databases fail on OFFSET itself

CatalogDep = NamedDependency[Catalog]
"""The app's async catalog, injected by name (``catalog``)."""
ServerDep = NamedDependency[ModelServer]
"""The app's :class:`ModelServer`, injected by name (``model_server``)."""

Limit = Annotated[
    int, Parameter(ge=1, le=MAX_PAGE, description=f"page size (1-{MAX_PAGE})")
]
Offset = Annotated[int, Parameter(ge=0, le=MAX_OFFSET, description="items to skip")]


def provide_catalog(state: State) -> Catalog:
    """The app's async catalog (one pool for the process on PostgreSQL)."""
    catalog: Catalog = state.catalog
    return catalog


def provide_server(state: State) -> ModelServer:
    """The app's model server (artifacts, exports, predictors)."""
    server: ModelServer = state.model_server
    return server


def detection_log_of(request: Request[Any, Any, Any]) -> DetectionLog:
    """The app's detection log, taken from its state rather than injected.

    With two injected dependencies Litestar resolves them concurrently in an
    anyio task group, per request: 13% of ``/detect``'s CPU under load
    (profile in docs/results.md). One dependency is resolved inline.
    """
    detection_log: DetectionLog = request.app.state.detection_log
    return detection_log


def actor_of(user: object) -> str:
    """The audit actor for an authenticated request."""
    return user.actor if isinstance(user, Principal) else "unknown"
