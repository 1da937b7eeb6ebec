"""The web console: server-rendered pages over the admin plane's own catalog,
registry and model server, beside the JSON API in the same process.

Pages are Jinja2 templates; interactions return HTML fragments htmx swaps in;
live training arrives as server-sent events (:mod:`admin_api.console.live`).
Sign-in turns an API key into a signed session cookie
(:mod:`admin_api.console.session`); every page checks the key's role exactly as
the API's guards do.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ControllerRouterHandler

from admin_api.console import pages_detect, pages_models, pages_signin, pages_training
from admin_api.console.auth import load_session
from admin_api.console.render import EXCEPTION_HANDLERS
from admin_api.settings import ApiSettings

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def console_handlers(settings: ApiSettings) -> list[ControllerRouterHandler]:
    """The console's routes: pages behind the session check, static files open."""
    pages = Router(
        path="/",
        route_handlers=[
            *pages_signin.HANDLERS,
            *pages_training.HANDLERS,
            *pages_models.HANDLERS,
            *pages_detect.HANDLERS,
            pages_detect.detect_handler(settings),
        ],
        before_request=load_session,
        exception_handlers=EXCEPTION_HANDLERS,
        opt={"exclude_from_auth": True},  # cookies here, not bearer keys
        include_in_schema=False,
    )
    static = create_static_files_router(
        path="/static",
        directories=[STATIC],
        opt={"exclude_from_auth": True},
        include_in_schema=False,
        cache_control=None,
    )
    return [pages, static]


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine)


__all__ = ["console_handlers", "template_config"]
