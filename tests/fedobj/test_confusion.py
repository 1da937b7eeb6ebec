"""The confusion matrix ``evaluate`` counts, and how it travels in version metrics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from fedobj.confusion import confusion_from_metrics, confusion_metrics
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.model import ModelArgs, build_model
from fedobj.train import LabelledTensors, evaluate, map_to_class_map


def _test_split(n: int) -> LabelledTensors:
    data = load_fashion_mnist("test").subset(np.arange(n))
    return map_to_class_map(data, fashion_mnist_class_map()).tensors


def test_evaluate_counts_every_image_once_and_the_diagonal_is_the_hits() -> None:
    torch.manual_seed(0)
    data = _test_split(300)
    model = build_model(ModelArgs("cnn", 10))
    res = evaluate(model, data, batch_size=64)  # several batches, a ragged last one
    assert res.num_examples == 300
    assert sum(res.confusion.values()) == 300
    assert all(n > 0 for n in res.confusion.values())  # non-zero cells only
    hits = sum(n for (t, p), n in res.confusion.items() if t == p)
    assert hits == round(res.accuracy * 300)
    rows = Counter[int]()
    for (t, _), n in res.confusion.items():
        rows[t] += n
    assert rows == Counter(data.labels.tolist())  # row sums: images per class
    for c, acc in res.per_class_accuracy.items():
        assert res.confusion.get((c, c), 0) == round(acc * rows[c])


def test_evaluate_confusion_of_a_model_that_always_says_one_class() -> None:
    data = _test_split(200)
    model = build_model(ModelArgs("cnn", 10))
    head = model.classifier
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias.fill_(0.0)
        head.bias[3] = 100.0  # row 3 wins every prediction
    per_class = Counter(data.labels.tolist())
    res = evaluate(model, data)
    assert res.confusion == {(c, 3): n for c, n in per_class.items()}
    # class 3 masked: the runner-up takes every prediction, never 3
    masked = evaluate(model, data, active=[i for i in range(10) if i != 3])
    assert sum(masked.confusion.values()) == 200
    assert all(p != 3 for _, p in masked.confusion)


def test_evaluate_of_no_images_has_an_empty_matrix() -> None:
    empty = LabelledTensors(
        torch.zeros((0, 1, 28, 28), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    )
    assert evaluate(build_model(ModelArgs("cnn", 10)), empty).confusion == {}


def test_confusion_round_trips_through_version_metrics() -> None:
    cells = {(0, 0): 50, (0, 6): 7, (6, 0): 3, (6, 6): 40, (9, 9): 12, (1, 1): 0}
    metrics = confusion_metrics(cells)
    assert metrics == {
        "confusion-0-0": 50.0,
        "confusion-0-6": 7.0,
        "confusion-6-0": 3.0,
        "confusion-6-6": 40.0,
        "confusion-9-9": 12.0,
    }  # zero cells left out
    classes, matrix = confusion_from_metrics({"accuracy": 0.9, **metrics})
    assert classes == [0, 6, 9]
    assert matrix == [[50, 7, 0], [3, 40, 0], [0, 0, 12]]
    back = {
        (classes[i], classes[j]): n
        for i, row in enumerate(matrix)
        for j, n in enumerate(row)
        if n
    }
    assert back == {k: v for k, v in cells.items() if v}


def test_confusion_from_metrics_reads_only_its_own_keys() -> None:
    metrics: dict[str, object] = {
        "accuracy": 0.5,
        "class-2-accuracy": 0.5,
        "confusion-2-2": 4,
        "confusion-2-x": 9,  # not a cell
        "confusion-3-3": "many",  # not a number
        "xconfusion-1-1": 5,
    }
    assert confusion_from_metrics(metrics) == ([2], [[4]])
    assert confusion_from_metrics({}) == ([], [])
