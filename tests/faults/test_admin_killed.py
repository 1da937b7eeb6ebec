"""The admin API SIGKILLed during concurrent category writes, then restarted.

Every name answered 201 is present exactly once, nothing is doubled, each
category has exactly one ``category.create`` audit row, the class indices are
0..n-1 without gaps, and on SQLite the file passes ``PRAGMA integrity_check``.

Why no gaps rather than "unique and increasing": ``add_category`` bumps the
``class_index`` counter (``_next_number``) inside the same write transaction as
the insert and its audit row, so a write killed before its commit rolls the
counter back with it; an index is consumed only by a committed category, and
contract 1 (never reused) still holds because deletes do not touch the counter.
The first write after the restart therefore gets index n, and the audit rows in
commit order carry increasing indices.

A request without an answer (in flight at the kill, or refused after it) may or
may not have committed: its name may be present, never twice.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sqlite3
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fedobj.catalog import SyncCatalog
from tests.admin_api.conftest import make_keys
from tests.admin_api.server import Served, serve
from tests.fedobj.catalog.conftest import (  # noqa: F401  (fixture)
    KINDS,
    _empty_database,
    postgres_url,
)

pytestmark = [pytest.mark.faults]

WRITES = 300
KILL_AFTER = 100  # answers before the SIGKILL: the rest are in flight or queued
CONNECTIONS = 50  # concurrent requests on the wire at any time
PREFIX = "Killed write"
NO_RATE_LIMIT = ("--rate-limit", "0")


@dataclass
class Fired:
    """What the clients saw: 201s with their index, other answers, no answers."""

    acknowledged: dict[str, int] = field(default_factory=dict)
    refused: Counter[int] = field(default_factory=Counter)
    unanswered: int = 0

    @property
    def answered(self) -> int:
        return len(self.acknowledged) + sum(self.refused.values())


async def _fire(served: Served, names: list[str], kill: Callable[[], None]) -> Fired:
    """POST every name concurrently; call ``kill`` right after the
    ``KILL_AFTER``-th answer, while up to ``CONNECTIONS`` requests are open."""
    fired = Fired()
    limits = httpx.Limits(
        max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS
    )
    async with httpx.AsyncClient(
        base_url=served.base_url,
        headers=served.auth("admin"),
        timeout=30,
        limits=limits,
    ) as http:

        async def one(name: str) -> None:
            try:
                resp = await http.post("/api/v1/categories", json={"name": name})
            except httpx.TransportError:
                fired.unanswered += 1
                return
            if resp.status_code == 201:
                fired.acknowledged[name] = resp.json()["class_index"]
            else:
                fired.refused[resp.status_code] += 1
            if fired.answered == KILL_AFTER:
                kill()

        await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), 120)
    return fired


def _is_the_server(pid: int) -> None:
    """The pid runs ``fedobj admin serve`` itself (uvicorn in-process), with no
    worker children that would outlive it and keep answering."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"admin" in cmdline and b"serve" in cmdline, cmdline
    children = [
        c
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    assert not children, f"server {pid} has children {children}"


def _listed_over_http(served: Served) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    with httpx.Client(base_url=served.base_url, timeout=30) as http:
        while True:
            page = http.get(
                "/api/v1/categories",
                params={"limit": 200, "offset": len(items)},
                headers=served.auth("viewer"),
            )
            assert page.status_code == 200, page.text
            body = page.json()
            items += body["items"]
            if len(items) >= body["total"] or not body["items"]:
                assert len(items) == body["total"]
                return items


def _integrity(db_url: str) -> str:
    path = db_url.removeprefix("sqlite://")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as c:
        return str(c.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.parametrize("kind", KINDS)
def test_killed_during_concurrent_writes_loses_and_doubles_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    names = [f"{PREFIX} {i:03d}" for i in range(WRITES)]
    with _empty_database(kind, request) as url:
        catalog = SyncCatalog(url)
        catalog.migrate()
        keys = make_keys(catalog, tmp_path / "api-secret")

        with serve(tmp_path, url, keys, extra=NO_RATE_LIMIT) as first:
            pid = first.proc.pid
            _is_the_server(pid)
            kill = functools.partial(os.kill, pid, signal.SIGKILL)
            fired = asyncio.run(_fire(first, names, kill))
            assert fired.answered >= KILL_AFTER, f"never killed: {fired}"
            assert first.proc.wait(timeout=10) == -signal.SIGKILL
            with pytest.raises(httpx.TransportError):  # the killed pid was the server
                httpx.get(f"{first.base_url}/health", timeout=5)
        assert not fired.refused, f"non-201 answers before the kill: {fired.refused}"
        assert fired.unanswered > 0, "the kill came after every request was answered"

        with serve(tmp_path, url, keys, extra=NO_RATE_LIMIT) as again:
            present = catalog.list_categories(limit=WRITES + 10)
            by_name = {c.name: c for c in present}
            doubled = [n for n, k in Counter(c.name for c in present).items() if k > 1]
            assert not doubled, f"present more than once: {doubled}"
            lost = sorted(set(fired.acknowledged) - set(by_name))
            assert not lost, f"answered 201 but missing after the restart: {lost}"
            assert set(by_name) <= set(names)
            moved = {
                n: (i, by_name[n].class_index)
                for n, i in fired.acknowledged.items()
                if by_name[n].class_index != i
            }
            assert not moved, f"index differs from the 201's: {moved}"
            indices = sorted(c.class_index for c in present)
            assert indices == list(range(len(present))), indices

            audit = catalog.list_audit(action="category.create", limit=WRITES + 10)
            targets = Counter(a.target for a in audit)
            assert targets == Counter(str(c.id) for c in present), targets
            commit_order = sorted(audit, key=lambda a: a.id)
            assert [a.detail["class_index"] for a in commit_order] == indices

            listed = _listed_over_http(again)
            assert [(c["name"], c["class_index"]) for c in listed] == [
                (c.name, c.class_index) for c in present
            ]
            with httpx.Client(base_url=again.base_url, timeout=30) as http:
                after = http.post(
                    "/api/v1/categories",
                    json={"name": f"{PREFIX} after restart"},
                    headers=again.auth("admin"),
                )
            assert after.status_code == 201, after.text
            assert after.json()["class_index"] == len(present)  # counter not ahead

        if kind == "sqlite":
            assert _integrity(url) == "ok"
