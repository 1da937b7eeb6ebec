"""Local training and evaluation, readable top to bottom.

Data arrives as uint8 tensors already in memory (a node's partition is small), so the
loops index tensors directly instead of going through a DataLoader: no worker
processes, no per-sample Python, which matters when hundreds of virtual clients share
two cores.

One module per job: :mod:`~fedobj.train.tensors` (a node's data, mapped through the
class map), :mod:`~fedobj.train.settings` (what a stretch is asked and reports),
:mod:`~fedobj.train.losses` (masking, distillation),
:mod:`~fedobj.train.loop` (the plain SGD loop), :mod:`~fedobj.train.evaluation`,
:mod:`~fedobj.train.schedule` (the per-round learning rate) and
:mod:`~fedobj.train.private` (DP-SGD). This package re-exports their public names,
which is how the apps, the simulations and the tests import them.
"""

from fedobj.train.evaluation import EvalResult, evaluate
from fedobj.train.loop import channels_last, train
from fedobj.train.losses import DISTILL_TEMPERATURE, distillation_loss
from fedobj.train.private import (
    DP_GRAD_SAMPLE_MODES,
    DpSettings,
    PrivateTrainResult,
    batch_mixing_layers,
    bookkeeping_private,
    dp_plan,
    resolve_grad_sample_mode,
    train_private,
)
from fedobj.train.schedule import lr_for_round
from fedobj.train.settings import TrainConfig, TrainResult
from fedobj.train.tensors import (
    PIXEL_MEAN,
    PIXEL_STD,
    LabelledTensors,
    MappedData,
    map_to_class_map,
    to_input,
)

__all__ = [
    "DISTILL_TEMPERATURE",
    "DP_GRAD_SAMPLE_MODES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "DpSettings",
    "EvalResult",
    "LabelledTensors",
    "MappedData",
    "PrivateTrainResult",
    "TrainConfig",
    "TrainResult",
    "batch_mixing_layers",
    "bookkeeping_private",
    "channels_last",
    "distillation_loss",
    "dp_plan",
    "evaluate",
    "lr_for_round",
    "map_to_class_map",
    "resolve_grad_sample_mode",
    "to_input",
    "train",
    "train_private",
]
