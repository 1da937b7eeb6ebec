"""HeadGrowth alone: when the head grows, and what follows a growth."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from apps.growth import HeadGrowth, NoActiveCategoryError, grow_moments
from fedobj.classmap import ClassEntry, ClassMap
from fedobj.model import ModelArgs

W, B = "classifier.weight", "classifier.bias"  # the cnn's head (head_keys)


def cmap(n: int, inactive: tuple[int, ...] = ()) -> ClassMap:
    return ClassMap(
        tuple(ClassEntry(i, f"c{i}", f"C{i}", i not in inactive) for i in range(n))
    )


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def two_class_model() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        W: np.array([[3.0, 4.0], [0.0, 5.0]], np.float32),
        B: np.array([1.0, 3.0], np.float32),
    }


def started(**kw: object) -> HeadGrowth:
    growth = HeadGrowth(ModelArgs("cnn", 2), **kw)  # type: ignore[arg-type]
    growth.start_from(cmap(2))
    return growth


def test_a_larger_snapshot_grows_the_head_and_keeps_old_rows() -> None:
    growth = started()
    arrays, grew_from = growth.grow(record(two_class_model()), cmap(3), 5)
    assert grew_from == 2 and (growth.grown_from, growth.grew_at) == (2, 5)
    w, b = arrays[W].numpy(), arrays[B].numpy()
    np.testing.assert_array_equal(w[:2], [[3, 4], [0, 5]])
    np.testing.assert_allclose(w[2], [1.5, 4.5], atol=0.1)  # the old rows' mean
    np.testing.assert_array_equal(b, [1, 3, 2])
    np.testing.assert_array_equal(
        arrays["conv.weight"].numpy(), two_class_model()["conv.weight"]
    )
    assert growth.model_args.num_classes == 3 and growth.class_map == cmap(3)


def test_a_snapshot_without_new_classes_only_becomes_the_map() -> None:
    growth = started()
    arrays = record(two_class_model())
    out, grew_from = growth.grow(arrays, cmap(2, inactive=(1,)), 3)
    assert out is arrays and grew_from is None and growth.grew_at is None
    assert growth.class_map.active_indices == [0]
    assert growth.active_slugs == {"c0"}
    assert growth.model_args.num_classes == 2


def test_no_active_category_is_refused_at_start_and_in_a_round() -> None:
    growth = HeadGrowth(ModelArgs("cnn", 2))
    with pytest.raises(NoActiveCategoryError, match="no active category"):
        growth.start_from(cmap(2, inactive=(0, 1)))
    growth = started()
    with pytest.raises(NoActiveCategoryError):
        growth.grow(record(two_class_model()), cmap(3, inactive=(0, 1, 2)), 2)


def test_the_windows_after_a_growth() -> None:
    """Growth at round 5: distillation for rounds 5 and 6 (2 old classes);
    nothing before a growth."""
    growth = started(distill_rounds=2)
    assert growth.distill_classes(5) == 0
    growth.grow(record(two_class_model()), cmap(3), 5)
    assert [growth.distill_classes(r) for r in (4, 5, 6, 7)] == [0, 2, 2, 0]


def test_server_moments_grow_with_zero_rows() -> None:
    class Adam:
        m_t = {W: np.ones((2, 2)), "conv.weight": np.ones((2, 3))}
        v_t = None  # before its first aggregation

    adam = Adam()
    grow_moments(adam, (W, B), 4)
    np.testing.assert_array_equal(adam.m_t[W], [[1, 1], [1, 1], [0, 0], [0, 0]])
    assert adam.m_t["conv.weight"].shape == (2, 3) and adam.v_t is None
    grow_moments(object(), (W, B), 4)  # FedAvg: nothing to grow


def test_a_rollback_brings_back_the_checkpoints_map_and_architecture() -> None:
    growth = started()
    growth.follow(cmap(4), ModelArgs("cnn", 4))
    assert growth.class_map.num_classes == 4 and growth.model_args.num_classes == 4
