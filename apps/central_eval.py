"""The server's own evaluation of every round's model: on what, and how.

What a version's accuracy, per-class accuracy and confusion matrix are measured
on: Fashion-MNIST's test split by default, or, with ``central-eval-dir``, a
folder the server holds, laid out like a device's (``<dir>/<category-slug>/
*.png|jpg``). Without the folder a catalog of one's own categories has nothing
to be scored on: versions carried no accuracy and ``promote="best"`` had nothing
to compare. The folder is read once, before round 1; an unusable one is refused
then, naming the key.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord

from apps.records import load_arrays
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.confusion import confusion_metrics
from fedobj.data.fashion_mnist import ImageArrays
from fedobj.data.image_folder import load_image_folder
from fedobj.data.node_data import load_test_set
from fedobj.errors import ConfigError, FedObjError
from fedobj.model.factory import ModelArgs, build_model, head_keys
from fedobj.train import LabelledTensors, evaluate, map_to_class_map

log = logging.getLogger("fedobj.server")


class CentralEvaluator:
    """Evaluates the global model on the server's labelled images.

    The images are mapped through each round's class map by their category
    slugs (categories not in the catalog are left out; inactive ones are never
    predicted), cached per map. ``source`` names where they came from.
    """

    def __init__(self, test: ImageArrays, args: ModelArgs, source: str) -> None:
        self.test = test
        self.args = args
        self.source = source
        self._cache: dict[tuple[ClassMap, int], tuple[LabelledTensors, torch.nn.Module]]
        self._cache = {}
        self._warned: frozenset[str] = frozenset()

    def unknown_slugs(self, class_map: ClassMap) -> list[str]:
        """The image folders' categories ``class_map`` does not have."""
        known = class_map.slug_to_index
        return sorted(s for s in self.test.label_slugs if s not in known)

    def __call__(
        self, server_round: int, arrays: ArrayRecord, class_map: ClassMap
    ) -> dict[str, float]:
        # the head's rows come from the arrays: after a hard-deleted category the
        # class map may end below the head, never above it
        rows = int(arrays[head_keys(self.args)[0]].numpy().shape[0])
        key = (class_map, rows)
        if key not in self._cache:
            self.warn_unknown(class_map)
            self._cache = {
                key: (
                    map_to_class_map(self.test, class_map).tensors,
                    build_model(self.args.with_classes(rows)),
                )
            }
        data, model = self._cache[key]
        if len(data) == 0:
            return {}  # no image of an active category: no accuracy, not zero
        load_arrays(model, arrays)
        res = evaluate(model, data, class_map.active_indices)
        out = {"accuracy": res.accuracy, "loss": res.loss}
        out.update(
            {f"class-{k}-accuracy": v for k, v in res.per_class_accuracy.items()}
        )
        out.update(confusion_metrics(res.confusion))
        return out

    def warn_unknown(self, class_map: ClassMap) -> None:
        """Name the folders skipped under ``class_map``, once per set of them
        (a category added mid-run makes its folder count from then on)."""
        unknown = frozenset(self.unknown_slugs(class_map))
        if unknown and unknown != self._warned:
            log.warning(
                "central evaluation on %s: skipping %s (not categories of the catalog)",
                self.source,
                ", ".join(sorted(unknown)),
            )
        self._warned = unknown


def central_evaluator(
    cfg: RunConfig, args: ModelArgs, class_map: ClassMap
) -> CentralEvaluator | None:
    """The run's central evaluation (None with ``central-eval=false``).

    With ``central-eval-dir`` the folder is read now, before round 1: a missing
    or empty folder, or one with no category of ``class_map``, is refused with
    the key named; folders of categories the catalog does not know are skipped
    and named in a warning.
    """
    ev = cfg.evaluation
    if not ev.central_eval:
        return None
    if not ev.central_eval_dir:
        dataset = cfg.simulation.dataset_dir
        test = load_test_set(dataset, args.in_channels, args.image_size)
        return CentralEvaluator(test, args, "Fashion-MNIST's test split")
    folder = ev.central_eval_dir
    try:
        test, report = load_image_folder(folder, args.in_channels, args.image_size)
    except FedObjError as exc:
        raise ConfigError(f"run config `central-eval-dir`: {exc}") from None
    report.warn_skipped(log, f"central-eval-dir {folder}")
    evaluator = CentralEvaluator(test, args, folder)
    unknown = evaluator.unknown_slugs(class_map)
    if len(unknown) == len(test.label_slugs):
        raise ConfigError(
            f"run config `central-eval-dir`: {folder} holds no folder named after "
            f"a category of the catalog (found {', '.join(unknown)}; the "
            f"catalog's: {', '.join(sorted(class_map.slug_to_index)) or 'none'})"
        )
    log.info(
        "central evaluation on %s: %d images of %d categories",
        folder,
        len(test) - sum(report.counts[s] for s in unknown),
        len(test.label_slugs) - len(unknown),
    )
    evaluator.warn_unknown(class_map)
    return evaluator
