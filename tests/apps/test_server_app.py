"""Pieces of the ServerApp that run without Flower's runtime."""

from __future__ import annotations

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
