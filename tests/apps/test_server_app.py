"""Pieces of the ServerApp that run without Flower's runtime."""

from __future__ import annotations

import pytest

from apps.records import model_to_arrays
from apps.server_app import CentralEvaluator
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.model import ModelArgs, build_model


def test_central_evaluator_follows_the_class_map_and_the_head() -> None:
    cm = fashion_mnist_class_map()
    args = ModelArgs("cnn", 10)
    evaluator = CentralEvaluator(RunConfig(), args)
    arrays = model_to_arrays(build_model(args))
    full = evaluator(1, arrays, cm)
    assert 0.0 <= full["accuracy"] <= 1.0
    assert {f"class-{k}-accuracy" for k in range(10)} <= set(full)
    # a map shorter than the head (a category was hard-deleted): still evaluates,
    # on the images of the categories it has
    shorter = evaluator(2, arrays, ClassMap(cm.entries[:8]))
    assert "class-9-accuracy" not in shorter and "class-7-accuracy" in shorter


def test_too_few_nodes_is_a_clear_error_before_round_1() -> None:
    from apps.server_app import wait_for_nodes
    from fedobj.errors import ConfigError

    class TwoNodes:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    assert wait_for_nodes(TwoNodes(), 2, settle_s=0.0, max_wait_s=2.0) == 2  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min-nodes`=5"):
        wait_for_nodes(TwoNodes(), 5, settle_s=0.0, max_wait_s=0.3)  # type: ignore[arg-type]
