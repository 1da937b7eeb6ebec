"""Piccolo configuration for Piccolo's own CLI and migration runner.

Piccolo's migration machinery finds its engine through ``engine_finder()``, i.e.
the ``DB`` of the module named by ``$PICCOLO_CONF``. For the command line::

    PICCOLO_CONF=fedobj.catalog.piccolo_conf piccolo migrations new catalog --auto
    PICCOLO_CONF=fedobj.catalog.piccolo_conf piccolo migrations forwards catalog

``DB`` follows ``$FEDOBJ_DATABASE_URL`` (default: ``fedobj-catalog.sqlite`` in the
working directory). :func:`fedobj.catalog.migrate` swaps ``DB`` for the engine of
the database it was asked to migrate; application code never reads ``DB``.
"""

from __future__ import annotations

from piccolo.conf.apps import AppRegistry

from fedobj.catalog.db import make_engine, resolve_url

DB = make_engine(resolve_url(None, default_path="fedobj-catalog.sqlite"))

APP_REGISTRY = AppRegistry(apps=["fedobj.catalog.piccolo_app"])
