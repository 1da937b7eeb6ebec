"""The serving process's read cache and statement pool (DESIGN.md contract 12).

The admin API serves the category list, the current version and the class map
from memory, revalidated by a change counter that triggers bump in the writing
transaction. These tests hold that to "never older than the last committed
write", for writes from this process, from another process and from a rolled
back transaction, on both databases.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedobj.catalog import Catalog, SyncCatalog

FEDOBJ = str(Path(sys.executable).with_name("fedobj"))


def _register(catalog: SyncCatalog, round: int) -> str:
    version = catalog.register_version(
        run_id="r",
        round=round,
        class_map=catalog.snapshot(),
        metrics={},
        checkpoint_uri=f"/nowhere/{round}.pt",
        checkpoint_sha256="00",
    )
    return str(version.id)


def test_counter_moves_with_every_category_and_version_write(
    catalog: SyncCatalog, acatalog: Catalog
) -> None:
    def count() -> int:
        return asyncio.run(acatalog.change_count())

    seen = [count()]

    def moved() -> bool:
        seen.append(count())
        return seen[-1] > seen[-2]

    shoe = catalog.add_category("Shoe")
    assert moved()
    catalog.update_category(shoe.id, description="worn")
    assert moved()
    first = _register(catalog, 1)
    assert moved()
    _register(catalog, 2)
    assert moved()
    catalog.set_current(first)
    assert moved()
    catalog.deactivate_category(shoe.id)
    assert moved()
    catalog.delete_category(catalog.add_category("Hat").id)
    assert moved()
    # writes the cached reads do not depend on leave it alone
    catalog.create_api_key("k1", "0" * 64, "viewer", "x")
    asyncio.run(
        acatalog.record_detections("key:k1", "v0001", [("ab", {"predictions": []})])
    )
    assert not moved()


def test_cached_reads_follow_a_write_from_another_process(catalog_url: str) -> None:
    async def main() -> tuple[list[str], list[str], int]:
        catalog = Catalog(catalog_url)
        await catalog.start_pool()
        cache = catalog.cache_reads()
        try:
            await catalog.add_category("Shoe")
            before = [c.name for c in await catalog.list_categories()]
            await catalog.list_categories()
            hits = cache.hits
            # the CLI in a process of its own, then read at once: no window
            done = await asyncio.to_thread(
                subprocess.run,
                [FEDOBJ, "catalog", "add", "Hat", "--db", catalog_url],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            after = [c.name for c in await catalog.list_categories()]
            return before, after, hits
        finally:
            await catalog.close_pool()

    before, after, hits = asyncio.run(main())
    assert before == ["Shoe"]
    assert hits == 1  # the unchanged second read came from memory
    assert after == ["Shoe", "Hat"]


def test_a_rolled_back_write_leaves_nothing_cached(acatalog: Catalog) -> None:
    class Abort(Exception):
        pass

    async def main() -> tuple[list[str], list[str]]:
        await acatalog.start_pool()
        acatalog.cache_reads()
        try:
            await acatalog.add_category("Shoe")
            inside: list[str] = []
            with pytest.raises(Abort):
                async with acatalog._write():
                    await acatalog.add_category("Hat")
                    # inside the transaction: its own rows, not the cache's
                    inside = [c.name for c in await acatalog.list_categories()]
                    raise Abort
            after = [c.name for c in await acatalog.list_categories()]
            return inside, after
        finally:
            await acatalog.close_pool()

    inside, after = asyncio.run(main())
    assert inside == ["Shoe", "Hat"]
    assert after == ["Shoe"]


def test_current_version_and_class_map_follow_a_rollback(
    catalog: SyncCatalog, catalog_url: str
) -> None:
    catalog.add_category("Shoe")
    first = _register(catalog, 1)
    second = _register(catalog, 2)

    async def main() -> list[str]:
        served = Catalog(catalog_url)
        await served.start_pool()
        served.cache_reads()
        try:
            names = []
            for _ in range(2):
                current = await served.current_version()
                assert current is not None
                names.append(str(current.id))
                await asyncio.to_thread(catalog.set_current, first)
            await asyncio.to_thread(catalog.add_category, "Hat")
            assert (await served.snapshot()).num_classes == 2
            return names
        finally:
            await served.close_pool()

    assert asyncio.run(main()) == [second, first]


def test_a_process_that_never_closes_its_pool_still_exits(catalog_url: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from fedobj.catalog import Catalog

        async def main():
            catalog = Catalog({catalog_url!r})
            await catalog.start_pool()
            catalog.cache_reads()
            await catalog.add_category("Shoe")  # a kept transaction connection
            await catalog.list_categories()
            print("read", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "read"
