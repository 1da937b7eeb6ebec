"""The Litestar application: routes, auth, limits, errors, docs, metrics.

``create_app(settings)`` wires everything and opens nothing: the catalog is
migrated, its pool opened and the API secret read in the app's start-up hook, so
building an app in a test or under ``uvicorn --factory`` is cheap and side-effect
free until it serves.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusConfig

from admin_api.auth import ApiKeyMiddleware, KeyCache
from admin_api.console import console_handlers, template_config
from admin_api.console.live import Broadcaster
from admin_api.console.session import SessionCodec
from admin_api.detection_log import DetectionLog
from admin_api.problems import EXCEPTION_HANDLERS
from admin_api.routes.categories import CategoryController
from admin_api.routes.common import provide_catalog, provide_server
from admin_api.routes.detect import detect_controller
from admin_api.routes.runs import NodeController, RunController
from admin_api.routes.system import (
    AuditController,
    MetricsController,
    health,
    refresh_version_gauge,
)
from admin_api.routes.versions import VersionController
from admin_api.settings import MB, ApiSettings
from fedobj.apikeys import load_secret
from fedobj.catalog import Catalog
from fedobj.registry import ArtifactStore
from fedobj.serving import ModelServer

log = logging.getLogger("admin_api")

API_PREFIX = "/api/v1"
PUBLIC_PATHS = ["^/health$", "^/schema"]


def create_app(settings: ApiSettings | None = None) -> Litestar:
    """Build the admin API for ``settings`` (defaults: the run's outputs)."""
    settings = settings or ApiSettings()
    catalog = Catalog(settings.catalog_url, default_path=settings.catalog_default_path)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await catalog.migrate()
        await catalog.start_pool()
        catalog.cache_reads()
        app.state.detection_log = DetectionLog(catalog)
        app.state.detection_log.start()
        app.state.api_secret = load_secret(settings.secret_path)
        app.state.session_codec = SessionCodec(app.state.api_secret)
        app.state.broadcaster = Broadcaster(catalog)
        app.state.model_server = ModelServer(
            catalog,
            ArtifactStore(settings.registry_root),
            threads=settings.inference_threads,
        )
        await refresh_version_gauge(catalog)
        log.info(
            "admin API on catalog %s, registry %s",
            catalog.url,
            app.state.model_server.store.public_root,
        )
        try:
            yield
        finally:
            await app.state.broadcaster.close()
            await app.state.detection_log.close()
            await catalog.close_pool()

    api = Router(
        path=API_PREFIX,
        route_handlers=[
            CategoryController,
            VersionController,
            RunController,
            NodeController,
            detect_controller(settings),
            AuditController,
        ],
    )
    middleware: list[DefineMiddleware] = []
    if settings.rate_limit_per_second > 0:
        middleware.append(
            RateLimitConfig(
                rate_limit=("second", settings.rate_limit_per_second),
                exclude=[*PUBLIC_PATHS, "^/static/"],
            ).middleware
        )
    middleware.append(DefineMiddleware(ApiKeyMiddleware, exclude=PUBLIC_PATHS))
    middleware.append(
        PrometheusConfig(
            app_name="fedobj", group_path=True, prefix="fedobj_http"
        ).middleware
    )
    return Litestar(
        route_handlers=[health, api, MetricsController, *console_handlers(settings)],
        template_config=template_config(),
        dependencies={
            "catalog": Provide(provide_catalog, sync_to_thread=False),
            "model_server": Provide(provide_server, sync_to_thread=False),
        },
        state=State(
            {
                "catalog": catalog,
                "settings": settings,
                "key_cache": KeyCache(settings.key_cache_seconds),
            }
        ),
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        cors_config=(
            CORSConfig(allow_origins=list(settings.cors_origins))
            if settings.cors_origins
            else None
        ),
        request_max_body_size=1 * MB,
        openapi_config=OpenAPIConfig(
            title="fedobj admin API",
            version="1",
            description=(
                "Categories, model versions, runs, nodes and detection for a "
                "fedobj federation. Send `Authorization: Bearer <key>`; keys are "
                "made by `fedobj admin keys create --role admin|viewer|device`."
            ),
            path="/schema",
            render_plugins=[SwaggerRenderPlugin(), JsonRenderPlugin()],
            components=Components(
                security_schemes={
                    "BearerAuth": SecurityScheme(type="http", scheme="bearer")
                }
            ),
            security=[{"BearerAuth": []}],
        ),
    )
