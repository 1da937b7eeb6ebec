"""The fedobj admin plane: a Litestar API over the catalog, the registry and
inference. ``fedobj admin serve`` runs it with uvicorn; tests build it with
:func:`create_app`."""

from admin_api.app import create_app
from admin_api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app"]
