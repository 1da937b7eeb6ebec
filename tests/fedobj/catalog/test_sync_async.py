"""The same catalog from plain synchronous code and from inside an event loop."""

from __future__ import annotations

import asyncio

import pytest

from fedobj.catalog import (
    Catalog,
    DuplicateCategoryError,
    NotFoundError,
    SyncCatalog,
)


def test_sync_api_many_calls_in_a_row(catalog: SyncCatalog) -> None:
    """Every call gets its own event loop; none may see a closed one."""
    catalog.seed_categories(["a", "b", "c"])
    for i in range(8):
        assert catalog.snapshot().num_classes == 3
        catalog.add_sample_counts({"a": 1})
        catalog.start_round("run", i, sampled=1)
        catalog.finish_round("run", i, replied=1, rejected=0, accuracy=0.1 * i)
    assert catalog.get_category("a").sample_count == 8
    assert len(catalog.rounds("run")) == 8


def test_sync_api_called_from_inside_a_running_loop(catalog: SyncCatalog) -> None:
    """A sync call made under a running loop runs in a worker thread instead."""
    catalog.add_category("a")

    async def main() -> int:
        return catalog.snapshot().num_classes

    assert asyncio.run(main()) == 1


def test_async_api_inside_asyncio(acatalog: Catalog) -> None:
    async def main() -> None:
        await acatalog.seed_categories(["a", "b"])
        counts = await asyncio.gather(
            acatalog.count_categories(),
            acatalog.count_categories(active=True),
            acatalog.snapshot(),
        )
        assert counts[0] == counts[1] == 2 and counts[2].num_classes == 2
        with pytest.raises(DuplicateCategoryError):
            await acatalog.add_category("A")
        added = await asyncio.gather(
            *(acatalog.add_category(f"n{i}") for i in range(4))
        )
        assert sorted(c.class_index for c in added) == [2, 3, 4, 5]
        version = await acatalog.register_version(
            run_id="r",
            round=1,
            class_map=await acatalog.snapshot(),
            metrics={"accuracy": 0.3},
            checkpoint_uri="file:///c",
            checkpoint_sha256="00",
        )
        current = await acatalog.current_version()
        assert current is not None and current.id == version.id
        with pytest.raises(NotFoundError):
            await acatalog.get_category("zzz")
        await acatalog.ping()

    asyncio.run(main())
    asyncio.run(acatalog.snapshot())  # the same object works in a second loop


def test_async_pool_for_a_long_lived_loop(acatalog: Catalog) -> None:
    async def main() -> int:
        await acatalog.start_pool()
        try:
            await acatalog.add_category("a")
            return (await acatalog.snapshot()).num_classes
        finally:
            await acatalog.close_pool()

    assert asyncio.run(main()) == 1


def test_async_migrate(db_url: str) -> None:
    fresh = Catalog(db_url)
    assert asyncio.run(fresh.migrate())
    assert asyncio.run(fresh.migrate()) == []
    assert SyncCatalog(db_url).migrate() == []
