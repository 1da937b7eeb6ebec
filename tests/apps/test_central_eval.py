"""The server's central evaluation: on Fashion-MNIST's test split, or on an image
folder of its own (``central-eval-dir``), laid out like a device's."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from apps.central_eval import CentralEvaluator, central_evaluator
from apps.records import model_to_arrays
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.confusion import confusion_from_metrics
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.data.image_folder import load_image_folder
from fedobj.data.node_data import load_test_set
from fedobj.errors import ConfigError
from fedobj.model import ModelArgs, build_model
from fedobj.train import evaluate, map_to_class_map
from tests.conftest import write_image_folder

ARGS = ModelArgs("cnn", 10)


def folder_config(folder: Path | str, **more: object) -> RunConfig:
    return RunConfig.from_flower({"central-eval-dir": str(folder), **more})


def test_fashion_mnist_evaluation_follows_the_class_map_and_the_head() -> None:
    cm = fashion_mnist_class_map()
    evaluator = CentralEvaluator(load_test_set("", 1, 28), ARGS, "test split")
    arrays = model_to_arrays(build_model(ARGS))
    full = evaluator(1, arrays, cm)
    assert 0.0 <= full["accuracy"] <= 1.0
    assert {f"class-{k}-accuracy" for k in range(10)} <= set(full)
    # a map shorter than the head (a category was hard-deleted): still evaluates,
    # on the images of the categories it has
    shorter = evaluator(2, arrays, ClassMap(cm.entries[:8]))
    assert "class-9-accuracy" not in shorter and "class-7-accuracy" in shorter
    default = central_evaluator(RunConfig(), ARGS, cm)
    assert default is not None and default.source == "Fashion-MNIST's test split"
    off = RunConfig.from_flower({"central-eval": False})
    assert central_evaluator(off, ARGS, cm) is None


def test_a_folder_is_scored_per_category_and_unknown_folders_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three catalog categories and a folder the catalog does not know: the
    accuracy, per-class accuracy and confusion matrix are those of the three
    categories' images, exactly as evaluated by hand; the fourth is skipped
    with a warning that names it."""
    root = write_image_folder(tmp_path / "eval", per_class=6, classes=3)
    unicorn = root / "unicorn"
    unicorn.mkdir()
    moved = next((root / "trouser").glob("*.png"))
    moved.replace(unicorn / moved.name)
    cm = fashion_mnist_class_map()
    with caplog.at_level(logging.INFO, logger="fedobj"):
        evaluator = central_evaluator(folder_config(root), ARGS, cm)
    assert evaluator is not None
    assert "skipping unicorn (not categories of the catalog)" in caplog.text
    assert "17 images of 3 categories" in caplog.text
    model = build_model(ARGS)
    arrays = model_to_arrays(model)
    got = evaluator(1, arrays, cm)

    data, _ = load_image_folder(root, 1, 28)
    want = evaluate(model, map_to_class_map(data, cm).tensors, cm.active_indices)
    assert got["accuracy"] == pytest.approx(want.accuracy)
    assert got["loss"] == pytest.approx(want.loss)
    per_class = {k for k in got if k.startswith("class-")}
    assert per_class == {"class-0-accuracy", "class-1-accuracy", "class-2-accuracy"}
    classes, matrix = confusion_from_metrics(got)
    assert set(classes) >= {0, 1, 2} and sum(map(sum, matrix)) == 17
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedobj"):
        evaluator(2, arrays, cm)
    assert "unicorn" not in caplog.text  # said once, not every round


def test_a_category_added_mid_run_starts_to_count(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "eval", per_class=4, classes=3)
    cm = fashion_mnist_class_map()
    two = ClassMap(cm.entries[:2])
    evaluator = central_evaluator(folder_config(root), ARGS.with_classes(2), two)
    assert evaluator is not None and evaluator.unknown_slugs(two) == ["pullover"]
    small = model_to_arrays(build_model(ARGS.with_classes(2)))
    assert {k for k in evaluator(1, small, two) if k.startswith("class-")} == {
        "class-0-accuracy",
        "class-1-accuracy",
    }
    three = ClassMap(cm.entries[:3])
    grown = model_to_arrays(build_model(ARGS.with_classes(3)))
    assert "class-2-accuracy" in evaluator(2, grown, three)


def test_an_unusable_folder_fails_before_round_one(tmp_path: Path) -> None:
    cm = fashion_mnist_class_map()
    with pytest.raises(ConfigError, match="`central-eval-dir`.*does not exist"):
        central_evaluator(folder_config(tmp_path / "missing"), ARGS, cm)
    empty = tmp_path / "empty"
    (empty / "trouser").mkdir(parents=True)
    (empty / "trouser" / "notes.txt").write_text("no image here")
    with pytest.raises(ConfigError, match="`central-eval-dir`.*no usable images"):
        central_evaluator(folder_config(empty), ARGS, cm)
    foreign = write_image_folder(tmp_path / "foreign", per_class=2, classes=2)
    only_theirs = ClassMap.from_names([("Cat", "cat"), ("Dog", "dog")])
    with pytest.raises(ConfigError, match="no folder named after a category"):
        central_evaluator(folder_config(foreign), ARGS, only_theirs)


def test_the_folder_key_is_checked_with_the_run_config() -> None:
    with pytest.raises(ConfigError, match="`central-eval-dir` must be an absolute"):
        RunConfig.from_flower({"central-eval-dir": "eval"})
    with pytest.raises(ConfigError, match="`central-eval` must be true"):
        RunConfig.from_flower({"central-eval-dir": "/srv/eval", "central-eval": False})


def test_no_image_of_an_active_category_gives_no_accuracy(tmp_path: Path) -> None:
    """A folder whose only category was deactivated scores nothing: no
    accuracy at all, rather than an accuracy of 0."""
    root = write_image_folder(tmp_path / "eval", per_class=3, classes=1)
    cm = fashion_mnist_class_map()
    evaluator = central_evaluator(folder_config(root), ARGS, cm)
    assert evaluator is not None
    inactive = ClassMap(
        tuple(e if e.index else type(e)(0, e.slug, e.name, False) for e in cm.entries)
    )
    assert evaluator(1, model_to_arrays(build_model(ARGS)), inactive) == {}
