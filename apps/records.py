"""Conversions between torch/fedobj objects and Flower records (Flower glue only)."""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from fedobj import keys
from fedobj.classmap import ClassMap
from fedobj.model.factory import ModelArgs


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(model.state_dict())


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load arrays into ``model`` strictly, cast to the model's own dtypes.

    Averaging turns integer buffers (BatchNorm's ``num_batches_tracked``) into floats;
    casting back here keeps the state dict exactly the model's.
    """
    incoming = arrays.to_torch_state_dict()
    own = model.state_dict()
    missing = set(own) - set(incoming)
    extra = set(incoming) - set(own)
    if missing or extra:
        raise ValueError(
            f"arrays do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    state = {}
    for k, ref in own.items():
        t = incoming[k]
        if t.shape != ref.shape:
            raise ValueError(f"{k}: shape {tuple(t.shape)} != model {tuple(ref.shape)}")
        state[k] = t.to(ref.dtype)
    model.load_state_dict(state, strict=True)


def arrays_to_state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def put_model_context(
    config: ConfigRecord, args: ModelArgs, class_map: ClassMap
) -> None:
    """Attach the model arguments and class map to an outgoing config (contract 2)."""
    config[keys.MODEL_ARGS] = json.dumps(args.to_dict(), sort_keys=True)
    config[keys.CLASS_MAP] = class_map.to_json()


def get_model_context(config: ConfigRecord) -> tuple[ModelArgs, ClassMap]:
    """Read what :func:`put_model_context` wrote; a missing key is a clear error."""
    for key in (keys.MODEL_ARGS, keys.CLASS_MAP):
        if key not in config:
            raise ValueError(
                f"message config has no {key!r}: server and node versions "
                "of fedobj differ?"
            )
    args = ModelArgs.from_dict(json.loads(str(config[keys.MODEL_ARGS])))
    return args, ClassMap.from_json(str(config[keys.CLASS_MAP]))
