"""Training pages: the live overview, runs and their rounds, nodes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import Parameter
from litestar.response import Redirect, ServerSentEvent, Template

from admin_api.auth import READ, WRITE
from admin_api.console.auth import is_htmx, require
from admin_api.console.live import Broadcaster
from admin_api.console.render import page
from admin_api.console.views import duration, overview
from admin_api.routes.common import CatalogDep, actor_of
from fedobj.catalog import NotFoundError

RunId = Annotated[str, Parameter(max_length=255)]


@get("/", name="console:overview")
async def overview_page(request: Request[Any, Any, Any], catalog: CatalogDep) -> Any:
    who = require(request, *READ, "device")
    if who.role == "device":  # a device key sees detection only
        return Redirect("/detect")
    view = await overview(catalog)
    return page(request, "overview.html", o=view, duration=duration)


@get("/overview/panel")
async def overview_panel(
    request: Request[Any, Any, Any], catalog: CatalogDep
) -> Template:
    """The live part of the overview (status, feed, current version)."""
    require(request, *READ)
    view = await overview(catalog)
    return page(request, "_overview_panel.html", o=view, duration=duration)


@get("/overview/series")
async def overview_series(
    request: Request[Any, Any, Any], catalog: CatalogDep
) -> dict[str, Any]:
    """Per-round accuracy and loss (central and federated) for the chart."""
    require(request, *READ)
    return (await overview(catalog)).series


@get("/events")
async def events(request: Request[Any, Any, Any]) -> ServerSentEvent:
    """Server-sent events: ``change`` whenever a round, node result or version
    is written (one watcher per process, however many pages listen)."""
    require(request, *READ)
    broadcaster: Broadcaster = request.app.state.broadcaster
    return ServerSentEvent(broadcaster.events(), headers={"Cache-Control": "no-store"})


@get("/runs")
async def runs_page(request: Request[Any, Any, Any], catalog: CatalogDep) -> Template:
    require(request, *READ)
    records = {r.run_id: r for r in await catalog.list_run_records(limit=200)}
    summaries = await catalog.list_runs()
    return page(
        request,
        "runs.html",
        summaries=summaries,
        records=records,
    )


@get("/runs/{run_id:str}")
async def run_page(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    run_id: RunId,
    round: Annotated[int | None, Parameter(ge=0, le=2**31 - 1)] = None,
) -> Template:
    """A run's rounds; one round's per-node results opened below it."""
    require(request, *READ)
    rounds = await catalog.rounds(run_id)
    if not rounds:
        raise NotFoundException(f"no run {run_id!r}")
    try:
        record = await catalog.get_run(run_id)
    except NotFoundError:
        record = None
    chosen = round if round is not None else rounds[-1].round
    results = await catalog.node_rounds(run_id, chosen)
    context: dict[str, Any] = {
        "run_id": run_id,
        "record": record,
        "rounds": rounds,
        "chosen": chosen,
        "results": results,
    }
    if is_htmx(request) and round is not None:
        return page(request, "_round_nodes.html", **context)
    return page(request, "run.html", **context)


@get("/nodes")
async def nodes_page(request: Request[Any, Any, Any], catalog: CatalogDep) -> Template:
    require(request, *READ)
    run = await catalog.list_run_records(limit=1)
    budget = None
    if run and run[0].config.get("dp"):
        budget = run[0].config.get("dp-epsilon")
    return page(request, "nodes.html", nodes=await catalog.list_nodes(), budget=budget)


@post("/nodes/{node_id:str}/forget", status_code=303)
async def forget_node(
    request: Request[Any, Any, Any],
    catalog: CatalogDep,
    node_id: Annotated[str, Parameter(max_length=255)],
) -> Response[Any]:
    """Erase a node's row and per-round metrics (audited); versions stay."""
    who = require(request, *WRITE)
    removed = await catalog.forget_node(node_id, actor=actor_of(who))
    if removed == 0:
        raise NotFoundException(f"no node {node_id!r}")
    return Redirect("/nodes", status_code=303)


HANDLERS = [
    overview_page,
    overview_panel,
    overview_series,
    events,
    runs_page,
    run_page,
    nodes_page,
    forget_node,
]
