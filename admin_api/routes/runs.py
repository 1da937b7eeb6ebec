"""``/api/v1/runs`` and ``/api/v1/nodes``: what training did, and who took part."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get
from litestar.params import Parameter
from litestar.status_codes import HTTP_204_NO_CONTENT

from admin_api.auth import READ, WRITE, allow
from admin_api.routes.common import CatalogDep, actor_of
from admin_api.schemas import (
    NodeOut,
    RoundDetailOut,
    RoundOut,
    RunOut,
    node_out,
    node_result_out,
    round_out,
    run_out,
)
from fedobj.catalog import NotFoundError

RunId = Annotated[str, Parameter(max_length=255, description="run id")]
NodeId = Annotated[str, Parameter(max_length=255, description="node id")]


class RunController(Controller):
    path = "/runs"
    tags = ["runs"]

    @get("/", guards=[allow(*READ)])
    async def list_runs(self, catalog: CatalogDep) -> list[RunOut]:
        """Every run, most recently started first."""
        return [run_out(r) for r in await catalog.list_runs()]

    @get("/{run_id:str}/rounds", guards=[allow(*READ)])
    async def rounds(self, catalog: CatalogDep, run_id: RunId) -> list[RoundOut]:
        """A run's rounds with status and centralised metrics."""
        rounds = await catalog.rounds(run_id)
        if not rounds:
            raise NotFoundError(f"no run {run_id!r}")
        return [round_out(r) for r in rounds]

    @get("/{run_id:str}/rounds/{round_number:int}", guards=[allow(*READ)])
    async def round_detail(
        self,
        catalog: CatalogDep,
        run_id: RunId,
        round_number: Annotated[int, Parameter(ge=0, le=2**31 - 1)],
    ) -> RoundDetailOut:
        """One round and what every node reported in it."""
        rounds = [r for r in await catalog.rounds(run_id) if r.round == round_number]
        if not rounds:
            raise NotFoundError(f"no round {round_number} in run {run_id!r}")
        results = await catalog.node_rounds(run_id, round_number)
        return RoundDetailOut(
            round=round_out(rounds[0]),
            node_results=[node_result_out(r) for r in results],
        )


class NodeController(Controller):
    path = "/nodes"
    tags = ["nodes"]

    @get("/", guards=[allow(*READ)])
    async def list_nodes(self, catalog: CatalogDep) -> list[NodeOut]:
        """Devices as they last reported themselves."""
        return [node_out(n) for n in await catalog.list_nodes()]

    @delete("/{node_id:str}", guards=[allow(*WRITE)], status_code=HTTP_204_NO_CONTENT)
    async def forget_node(
        self, catalog: CatalogDep, node_id: NodeId, request: Request[Any, Any, Any]
    ) -> None:
        """Forget a node: its row and per-round metrics are erased (right to be
        forgotten); model versions it contributed to stay."""
        removed = await catalog.forget_node(node_id, actor=actor_of(request.user))
        if removed == 0:
            raise NotFoundError(f"no node {node_id!r}")
