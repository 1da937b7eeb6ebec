"""Categories: index assignment, uniqueness, snapshots, deactivation, deletion."""

from __future__ import annotations

import threading
import uuid

import pytest

from fedobj.catalog import (
    CatalogValueError,
    CategoryInUseError,
    DuplicateCategoryError,
    InvalidCategoryError,
    NotFoundError,
    SyncCatalog,
)
from fedobj.classmap import ClassMap
from fedobj.data.categories import FASHION_MNIST_NAMES, fashion_mnist_class_map


def _register(catalog: SyncCatalog, name: str | None = None) -> None:
    catalog.register_version(
        run_id="run",
        round=1,
        class_map=catalog.snapshot(),
        metrics={"accuracy": 0.5},
        checkpoint_uri="file:///ckpt",
        checkpoint_sha256="0" * 64,
        name=name,
    )


def test_add_assigns_next_index_and_slug(catalog: SyncCatalog) -> None:
    a = catalog.add_category("  T-shirt/top ", "tops")
    b = catalog.add_category("Ankle boot")
    assert (a.name, a.slug, a.class_index, a.description) == (
        "T-shirt/top",
        "t-shirt-top",
        0,
        "tops",
    )
    assert (b.slug, b.class_index, b.is_active, b.sample_count) == (
        "ankle-boot",
        1,
        True,
        0,
    )
    assert a.created_at.tzinfo is not None


def test_class_index_never_reused_after_hard_delete(catalog: SyncCatalog) -> None:
    for name in ("a", "b", "c"):
        catalog.add_category(name)
    catalog.delete_category("c")  # the highest index, so max()+1 would reuse it
    assert catalog.add_category("d").class_index == 3
    catalog.delete_category("b")
    catalog.delete_category("d")
    assert catalog.add_category("e").class_index == 4
    catalog.delete_category("e")
    assert catalog.add_category("c").class_index == 5  # same name, new index
    assert [e.index for e in catalog.snapshot().entries] == [0, 5]


@pytest.mark.parametrize("again", ["sneaker", " SNEAKER ", "Sneaker"])
def test_duplicate_name_is_case_insensitive(catalog: SyncCatalog, again: str) -> None:
    catalog.add_category("Sneaker")
    with pytest.raises(DuplicateCategoryError, match="Sneaker"):
        catalog.add_category(again)
    assert catalog.count_categories() == 1
    assert catalog.add_category("Sneakers").class_index == 1  # no index was burnt


def test_slug_must_be_unique(catalog: SyncCatalog) -> None:
    catalog.add_category("T-shirt/top")
    with pytest.raises(DuplicateCategoryError, match="t-shirt-top"):
        catalog.add_category("T shirt top")


@pytest.mark.parametrize("bad", ["", "   ", "!!!", "x" * 256])
def test_invalid_names(catalog: SyncCatalog, bad: str) -> None:
    with pytest.raises(InvalidCategoryError):
        catalog.add_category(bad)


def test_get_by_id_slug_name_or_index(catalog: SyncCatalog) -> None:
    bag = catalog.add_category("Bag")
    for key in (bag.id, str(bag.id), "bag", "BAG", 0):
        assert catalog.get_category(key) == bag
    for missing in (uuid.uuid4(), "hat", 7):
        with pytest.raises(NotFoundError):
            catalog.get_category(missing)
    with pytest.raises(CatalogValueError):
        catalog.get_category(True)


def test_seed_is_idempotent_and_matches_fashion_mnist(catalog: SyncCatalog) -> None:
    first = catalog.seed_categories()
    second = catalog.seed_categories()
    assert first == second
    assert [c.name for c in first] == list(FASHION_MNIST_NAMES)
    assert catalog.snapshot() == fashion_mnist_class_map()


def test_snapshot_covers_every_category_with_gaps(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a", "b", "c", "d"])
    catalog.delete_category("b")
    catalog.deactivate_category("c")
    snap = catalog.snapshot()
    assert isinstance(snap, ClassMap)
    assert [(e.index, e.slug, e.active) for e in snap.entries] == [
        (0, "a", True),
        (2, "c", False),
        (3, "d", True),
    ]
    assert snap.num_classes == 4  # max(index) + 1, gap included
    assert snap.active_indices == [0, 3]
    catalog.delete_category("d")
    assert catalog.snapshot().num_classes == 3


def test_deactivate_keeps_index(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a", "b"])
    b = catalog.deactivate_category("b")
    assert (b.class_index, b.is_active) == (1, False)
    assert [c.slug for c in catalog.list_categories(active=True)] == ["a"]
    assert [c.slug for c in catalog.list_categories(active=False)] == ["b"]
    assert catalog.update_category("b", is_active=True).class_index == 1


def test_update_renames_but_keeps_slug(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["Sneaker", "Bag"])
    renamed = catalog.update_category("sneaker", name="Sneakers", description="x")
    assert (renamed.name, renamed.slug, renamed.description) == (
        "Sneakers",
        "sneaker",
        "x",
    )
    assert renamed.updated_at >= renamed.created_at
    assert catalog.update_category("bag", name="BAG").name == "BAG"  # own name
    with pytest.raises(DuplicateCategoryError):
        catalog.update_category("bag", name="sneakers")
    with pytest.raises(InvalidCategoryError):
        catalog.update_category("bag", name=" ")


def test_hard_delete_refused_once_a_version_includes_it(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["a", "b"])
    _register(catalog)
    with pytest.raises(CategoryInUseError, match="v0001"):
        catalog.delete_category("a")
    catalog.add_category("late")  # no version has seen it yet
    catalog.delete_category("late")
    assert catalog.get_category("a").is_active  # refused delete changed nothing
    catalog.deactivate_category("a")  # the allowed alternative (contract 9)


def test_delete_unknown(catalog: SyncCatalog) -> None:
    with pytest.raises(NotFoundError):
        catalog.delete_category("ghost")


def test_list_paging_and_search(catalog: SyncCatalog) -> None:
    catalog.seed_categories()
    page = catalog.list_categories(limit=3, offset=2)
    assert [c.class_index for c in page] == [2, 3, 4]
    assert [c.slug for c in catalog.list_categories(search="SHIRT")] == [
        "t-shirt-top",
        "shirt",
    ]
    assert catalog.count_categories(search="shirt") == 2
    assert catalog.list_categories(search="100%") == []  # % is literal
    assert catalog.list_categories(search="_") == []  # _ is literal


def test_sample_counts_add_up(catalog: SyncCatalog) -> None:
    catalog.seed_categories(["bag", "coat"])
    assert catalog.add_sample_counts({"bag": 5, "hat": 2}) == {"hat": 2}
    catalog.add_sample_counts({"bag": 1, "coat": 4})
    assert [c.sample_count for c in catalog.list_categories()] == [6, 4]
    with pytest.raises(CatalogValueError):
        catalog.add_sample_counts({"bag": -1})


def test_concurrent_adds_get_distinct_indices(
    catalog_url: str, catalog: SyncCatalog
) -> None:
    """Two writers (as the API and the CLI would be) never share an index."""
    errors: list[BaseException] = []

    def add(prefix: str) -> None:
        other = SyncCatalog(catalog_url)
        try:
            for i in range(5):
                other.add_category(f"{prefix}{i}")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(p,)) for p in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(c.class_index for c in catalog.list_categories()) == list(range(10))


def test_counter_row_recreated_if_missing(
    catalog_url: str, catalog: SyncCatalog
) -> None:
    """A damaged catalog (counter row gone) still never reuses an index."""
    from piccolo.utils.sync import run_sync

    catalog.seed_categories(["a", "b"])
    counter = catalog.aio.tables.Counter
    run_sync(counter.delete().where(counter.name == "class_index").run())
    assert catalog.add_category("c").class_index == 2  # resynced from max + 1
    assert catalog.add_category("d").class_index == 3
