"""Runs, rounds and nodes: the bookkeeping the strategy writes every round.

Writes are upserts, because a resumed run re-plays the round it crashed in and a
node re-reports itself every round; nothing here should fail on "already there".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedobj.catalog._base import CatalogBase, finite_or_none, guarded, plain_json
from fedobj.catalog.errors import CatalogValueError, NotFoundError
from fedobj.catalog.records import (
    NODE_ROUND_KINDS,
    ROUND_STATUSES,
    NodeRecord,
    NodeRoundRecord,
    RoundRecord,
    RunRecord,
    RunSummary,
    node_from_row,
    node_round_from_row,
    round_from_row,
    run_from_row,
)

RUN_STATUSES: tuple[str, ...] = ("running", "completed", "failed")


class RunOps(CatalogBase):
    """Round and node operations of :class:`fedobj.catalog.Catalog`."""

    # ------------------------------------------------------------ runs

    @guarded
    async def begin_run(
        self,
        run_id: str,
        *,
        strategy: str,
        model: str,
        first_round: int,
        last_round: int,
        config: dict[str, Any] | None = None,
    ) -> RunRecord:
        """Record that a run started (again, for a resumed run id: reset)."""
        t = self.tables.Run
        values: dict[Any, Any] = {
            t.status: "running",
            t.strategy: strategy,
            t.model: model,
            t.first_round: int(first_round),
            t.last_round: int(last_round),
            t.config: plain_json(config or {}, "run config"),
            t.error: None,
            t.started_at: self.clock(),
            t.finished_at: None,
        }
        async with self._write():
            exists = await t.exists().where(t.run_id == str(run_id))
            if exists:
                await t.update(values).where(t.run_id == str(run_id))
            else:
                await t.insert(
                    t(
                        run_id=str(run_id),
                        **{c._meta.name: v for c, v in values.items()},
                    )
                )
        return await self.get_run(run_id)

    @guarded
    async def end_run(
        self, run_id: str, status: str, error: str | None = None
    ) -> RunRecord:
        """Record how a run ended (``completed``, or ``failed`` with its error)."""
        if status not in RUN_STATUSES:
            raise CatalogValueError(
                f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}"
            )
        t = self.tables.Run
        async with self._write():
            await t.update(
                {t.status: status, t.error: error, t.finished_at: self.clock()}
            ).where(t.run_id == str(run_id))
        return await self.get_run(run_id)

    @guarded
    async def get_run(self, run_id: str) -> RunRecord:
        t = self.tables.Run
        row = (
            await t.select()
            .where(t.run_id == str(run_id))
            .first()
            .output(load_json=True)
        )
        if row is None:
            raise NotFoundError(f"no run {run_id!r}")
        return run_from_row(row)

    @guarded
    async def list_run_records(self, limit: int = 100) -> list[RunRecord]:
        """Runs as their ServerApps began them, most recent first."""
        t = self.tables.Run
        rows = (
            await t.select()
            .order_by(t.started_at, ascending=False)
            .limit(limit)
            .output(load_json=True)
        )
        return [run_from_row(r) for r in rows]

    # ------------------------------------------------------------ rounds

    @guarded
    async def start_round(self, run_id: str, round: int, sampled: int) -> RoundRecord:
        """Mark a round in progress with ``sampled`` nodes asked to train.

        Starting a round that exists (a resumed run) resets its counters.
        """
        t = self.tables.TrainingRound
        values: dict[Any, Any] = {
            t.status: "in_progress",
            t.nodes_sampled: int(sampled),
            t.nodes_replied: 0,
            t.nodes_rejected: 0,
            t.started_at: self.clock(),
            t.completed_at: None,
            t.central_accuracy: None,
            t.central_loss: None,
        }
        async with self._write():
            await self._upsert_round(str(run_id), int(round), values)
        return await self._round(str(run_id), int(round))

    @guarded
    async def finish_round(
        self,
        run_id: str,
        round: int,
        *,
        replied: int,
        rejected: int,
        accuracy: float | None = None,
        loss: float | None = None,
        status: str = "completed",
    ) -> RoundRecord:
        """Record how a round ended: replies kept and dropped, central metrics.

        Raises
        ------
        CatalogValueError
            ``status`` is not one of pending, in_progress, completed, failed.
        """
        if status not in ROUND_STATUSES:
            raise CatalogValueError(
                f"round status {status!r} is not one of {', '.join(ROUND_STATUSES)}"
            )
        t = self.tables.TrainingRound
        values: dict[Any, Any] = {
            t.status: status,
            t.nodes_replied: int(replied),
            t.nodes_rejected: int(rejected),
            t.completed_at: self.clock(),
            t.central_accuracy: finite_or_none(accuracy),
            t.central_loss: finite_or_none(loss),
        }
        async with self._write():
            await self._upsert_round(str(run_id), int(round), values)
        return await self._round(str(run_id), int(round))

    async def _upsert_round(
        self, run_id: str, round: int, values: dict[Any, Any]
    ) -> None:
        t = self.tables.TrainingRound
        where = (t.run_id == run_id) & (t.round == round)
        if await t.exists().where(where):
            await t.update(values).where(where)
        else:
            row = t(run_id=run_id, round=round)
            for column, value in values.items():
                setattr(row, column._meta.name, value)
            await t.insert(row)

    async def _round(self, run_id: str, round: int) -> RoundRecord:
        t = self.tables.TrainingRound
        row = await t.select().where((t.run_id == run_id) & (t.round == round)).first()
        if row is None:
            raise NotFoundError(f"no round {round} in run {run_id!r}")
        return round_from_row(row)

    @guarded
    async def rounds(self, run_id: str) -> list[RoundRecord]:
        """Every round of a run, in order."""
        t = self.tables.TrainingRound
        rows = await t.select().where(t.run_id == str(run_id)).order_by(t.round)
        return [round_from_row(r) for r in rows]

    @guarded
    async def list_runs(self) -> list[RunSummary]:
        """One summary per run, most recently started first."""
        t = self.tables.TrainingRound
        rows = (
            await t.select(t.run_id, t.round, t.status, t.started_at, t.completed_at)
            .order_by(t.run_id)
            .order_by(t.round)
        )
        runs: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            runs.setdefault(row["run_id"], []).append(row)
        out = []
        for run_id, rs in runs.items():
            started = [r["started_at"] for r in rs if r["started_at"] is not None]
            completed = [r["completed_at"] for r in rs if r["completed_at"] is not None]
            out.append(
                RunSummary(
                    run_id=run_id,
                    rounds=len(rs),
                    last_round=int(rs[-1]["round"]),
                    last_status=rs[-1]["status"],
                    started_at=min(started, default=None),
                    completed_at=max(completed, default=None),
                )
            )
        out.sort(key=lambda s: (s.started_at is not None, s.started_at), reverse=True)
        return out

    # ------------------------------------------------------------ nodes

    @guarded
    async def upsert_node(
        self,
        node_id: str | int,
        *,
        samples: int,
        label_names: Iterable[str] | None = None,
        status: str = "active",
        dp_epsilon: float | None = None,
    ) -> NodeRecord:
        """Record that a node was seen now, with its sample count and labels.

        Flower node ids are 64-bit integers; they are stored as text.
        ``label_names=None`` keeps the names the node reported before;
        ``dp_epsilon`` (the DP budget the device reports spent) likewise.
        """
        t = self.tables.Node
        key = str(node_id)
        values: dict[Any, Any] = {
            t.last_seen: self.clock(),
            t.samples: int(samples),
            t.status: status,
        }
        if label_names is not None:
            values[t.label_names] = [str(n) for n in label_names]
        if dp_epsilon is not None:
            values[t.dp_epsilon] = finite_or_none(dp_epsilon)
        async with self._write():
            if await t.exists().where(t.node_id == key):
                await t.update(values).where(t.node_id == key)
            else:
                values.setdefault(t.label_names, [])
                row = t(node_id=key)
                for column, value in values.items():
                    setattr(row, column._meta.name, value)
                await t.insert(row)
        return await self.get_node(key)

    @guarded
    async def get_node(self, node_id: str | int) -> NodeRecord:
        """One node. Raises :class:`NotFoundError`."""
        t = self.tables.Node
        row = (
            await t.select()
            .where(t.node_id == str(node_id))
            .output(load_json=True)
            .first()
        )
        if row is None:
            raise NotFoundError(f"no node {node_id!r}")
        return node_from_row(row)

    @guarded
    async def list_nodes(self) -> list[NodeRecord]:
        """Every known node, most recently seen first."""
        t = self.tables.Node
        rows = (
            await t.select()
            .order_by(t.last_seen, ascending=False)
            .output(load_json=True)
        )
        return [node_from_row(r) for r in rows]

    @guarded
    async def record_node_round(
        self,
        run_id: str,
        round: int,
        node_id: str | int,
        kind: str,
        *,
        num_examples: int = 0,
        loss: float | None = None,
        accuracy: float | None = None,
        error: str | None = None,
        train_seconds: float | None = None,
        dp_epsilon: float | None = None,
    ) -> None:
        """Store one node's reply (or its error) to a train/evaluate message.

        Raises
        ------
        CatalogValueError
            ``kind`` is neither ``"train"`` nor ``"evaluate"``.
        """
        if kind not in NODE_ROUND_KINDS:
            raise CatalogValueError(f"node round kind {kind!r}: train or evaluate")
        t = self.tables.NodeRound
        await t.insert(
            t(
                run_id=str(run_id),
                round=int(round),
                node_id=str(node_id),
                kind=kind,
                num_examples=int(num_examples),
                loss=finite_or_none(loss),
                accuracy=finite_or_none(accuracy),
                error=error,
                created_at=self.clock(),
                train_seconds=finite_or_none(train_seconds),
                dp_epsilon=finite_or_none(dp_epsilon),
            )
        )

    @guarded
    async def node_rounds(
        self, run_id: str, round: int | None = None, *, errors_only: bool = False
    ) -> list[NodeRoundRecord]:
        """Per-node replies of a run (one round, or all), in insertion order;
        ``errors_only``: only the replies that failed or were rejected."""
        t = self.tables.NodeRound
        query = t.select().where(t.run_id == str(run_id))
        query = query.order_by(t._meta.primary_key)
        if round is not None:
            query = query.where(t.round == int(round))
        if errors_only:
            query = query.where(t.error.is_not_null())
        return [node_round_from_row(r) for r in await query]

    @guarded
    async def federated_by_round(
        self, run_id: str
    ) -> dict[int, tuple[float | None, float | None]]:
        """Per round, the example-weighted accuracy and loss of the nodes' own
        evaluations (errors left out), summed in the database: a long run's
        overview need not load every node's row."""
        rows = await self.tables.NodeRound.raw(
            "SELECT round, SUM(num_examples) AS n,"
            " SUM(accuracy * num_examples) AS acc, COUNT(accuracy) AS acc_rows,"
            " SUM(loss * num_examples) AS loss, COUNT(loss) AS loss_rows"
            " FROM node_round WHERE run_id = {} AND kind = 'evaluate'"
            " AND error IS NULL GROUP BY round",
            str(run_id),
        )
        out: dict[int, tuple[float | None, float | None]] = {}
        for r in rows:
            n = float(r["n"] or 0)
            if n <= 0:
                out[int(r["round"])] = (None, None)
                continue
            acc = float(r["acc"]) / n if r["acc_rows"] else None
            loss = float(r["loss"]) / n if r["loss_rows"] else None
            out[int(r["round"])] = (acc, loss)
        return out

    @guarded
    async def forget_node(self, node_id: str | int, *, actor: str | None = None) -> int:
        """Delete a node and every per-node metric it left (right to be forgotten).

        Model versions stay: they hold aggregates, not the node's data. Returns the
        number of rows removed; forgetting an unknown node removes none.
        """
        key = str(node_id)
        n, nr = self.tables.Node, self.tables.NodeRound
        async with self._write():
            gone = (
                await nr.delete()
                .where(nr.node_id == key)
                .returning(nr._meta.primary_key)
            )
            gone_node = (
                await n.delete().where(n.node_id == key).returning(n._meta.primary_key)
            )
            if gone or gone_node:
                await self._audit(
                    actor,
                    "node.forget",
                    key,
                    {"rows_removed": len(gone) + len(gone_node)},
                )
        return len(gone) + len(gone_node)
