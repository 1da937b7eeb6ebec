"""Catalog fixtures: every test runs on a SQLite file and on a real PostgreSQL.

PostgreSQL is found at ``$FEDOBJ_TEST_POSTGRES_URL`` or, by default, at
127.0.0.1:5432 database ``test`` as user ``postgres`` (then ``root``), trust auth.
Each database is a schema of its own (``search_path`` in the URL) or a temporary
SQLite folder, dropped afterwards, so nothing is left behind; tests of the API
share one migrated database per kind and empty it first (see ``catalog_url``). When
the server is unreachable the PostgreSQL cases skip, except under ``CI=true``,
where they fail: a CI run must not pass having tested one database.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import asyncpg
import pytest

from fedobj.catalog import Catalog, SyncCatalog, migrate

PG_CANDIDATES = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs the PostgreSQL server")


async def _probe(url: str) -> str | None:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"{url}: {exc}"
    await conn.close()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """An admin URL of a reachable server, or skip (fail under CI=true)."""
    env = os.environ.get("FEDOBJ_TEST_POSTGRES_URL")
    candidates = (env,) if env else PG_CANDIDATES
    problems = []
    for url in candidates:
        problem = asyncio.run(_probe(url))
        if problem is None:
            return url
        problems.append(problem)
    message = "PostgreSQL unreachable for catalog tests: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: the PostgreSQL cases are required)")
    pytest.skip(message)


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

# Emptying a migrated database is ~50x faster than migrating a new one, so the
# tests that do not test migrations share one migrated database per kind.
RESET = (
    "DELETE FROM node_round",
    "DELETE FROM detection",
    "DELETE FROM audit_entry",
    "DELETE FROM api_key",
    "DELETE FROM node",
    "DELETE FROM training_round",
    "DELETE FROM run",
    "UPDATE model_version SET parent = NULL",
    "DELETE FROM model_version",
    "DELETE FROM category",
    "UPDATE catalog_counter SET value = 0",
    "UPDATE run_lease SET holder = NULL, acquired_at = NULL, expires_at = NULL",
)


@contextmanager
def _empty_database(kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database URL of ``kind``; removed afterwards."""
    if kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="fedobj-catalog-"))
        try:
            yield f"sqlite://{folder / 'catalog.db'}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    admin = request.getfixturevalue("postgres_url")
    schema = f"fedobj_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin, f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{admin}?search_path={schema}"
    finally:
        asyncio.run(_admin(admin, f'DROP SCHEMA "{schema}" CASCADE'))


def _reset(url: str) -> None:
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(url[len("sqlite://") :])) as conn, conn:
            for sql in RESET:
                conn.execute(sql)
        return

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            async with conn.transaction():
                for sql in RESET:
                    await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(params=KINDS)
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty (not migrated) database of each kind."""
    with _empty_database(request.param, request) as url:
        yield url


@pytest.fixture(scope="session", params=KINDS)
def _migrated_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with _empty_database(request.param, request) as url:
        migrate(url)
        yield url


@pytest.fixture
def catalog_url(_migrated_url: str) -> str:
    """A migrated database of each kind, emptied for this test."""
    _reset(_migrated_url)
    return _migrated_url


@pytest.fixture
def catalog(catalog_url: str) -> SyncCatalog:
    """A migrated, empty catalog with the blocking API."""
    return SyncCatalog(catalog_url)


@pytest.fixture
def acatalog(catalog_url: str) -> Catalog:
    """A migrated, empty catalog with the async API."""
    return Catalog(catalog_url)
