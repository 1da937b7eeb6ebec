"""Record conversions and the observing strategy wrapper, with hand-built replies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from apps.records import (
    get_model_context,
    load_arrays,
    model_to_arrays,
    put_model_context,
)
from apps.strategy import make_inner_strategy
from fedobj import keys
from fedobj.config import RunConfig
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.model import ModelArgs, build_model
from tests.apps.helpers import set_task_identity


class FakeGrid:
    """A Grid with fixed node ids; the strategy only samples from it here."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def test_load_arrays_casts_back_integer_buffers() -> None:
    model = build_model(ModelArgs("cnn", 10, norm="batch"))
    arrays = model_to_arrays(model)
    # FedAvg turns num_batches_tracked into float64 when it averages
    floaty = ArrayRecord(
        {k: v.to(torch.float64) for k, v in arrays.to_torch_state_dict().items()}
    )
    fresh = build_model(ModelArgs("cnn", 10, norm="batch"))
    load_arrays(fresh, floaty)
    for k, v in fresh.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype
        torch.testing.assert_close(v, model.state_dict()[k])


def test_load_arrays_rejects_wrong_shapes_and_keys() -> None:
    small = model_to_arrays(build_model(ModelArgs("cnn", 6)))
    with pytest.raises(ValueError, match="classifier.weight"):
        load_arrays(build_model(ModelArgs("cnn", 10)), small)
    gn = model_to_arrays(build_model(ModelArgs("cnn", 10, norm="group")))
    with pytest.raises(ValueError, match="missing"):
        load_arrays(build_model(ModelArgs("cnn", 10, norm="batch")), gn)


def test_model_context_round_trip_and_missing_key() -> None:
    cfg = ConfigRecord()
    args, cm = ModelArgs("cnn", 10), fashion_mnist_class_map()
    put_model_context(cfg, args, cm)
    assert get_model_context(cfg) == (args, cm)
    with pytest.raises(ValueError, match="class-map"):
        get_model_context(ConfigRecord({keys.MODEL_ARGS: json.dumps(args.to_dict())}))


def test_make_inner_strategy_by_name() -> None:
    for name in ("fedavg", "fedprox", "fedadam", "perffedavg"):
        config = {"strategy": name, "min-nodes": 3}
        inner = make_inner_strategy(RunConfig.from_flower(config))
        assert type(inner).__name__.lower() == name
        assert inner.min_available_nodes == 3


def test_perffedavg_weights_replies_by_size_and_local_accuracy() -> None:
    from flwr.app import MetricRecord, RecordDict

    from apps.perffedavg import PerfFedAvg
    from tests.apps.helpers import reply

    def r(node: int, value: float, n: int, acc: float | None) -> object:
        metrics = {keys.NUM_EXAMPLES: n}
        if acc is not None:
            metrics[keys.LOCAL_ACCURACY] = acc
        return reply(
            node,
            RecordDict(
                {
                    keys.ARRAYS: ArrayRecord([np.full(2, value, np.float32)]),
                    keys.METRICS: MetricRecord(metrics),
                }
            ),
        )

    set_task_identity()
    s = PerfFedAvg(perf_alpha=0.5)
    agg, _ = s.aggregate_train(1, [r(1, 0.0, 100, 0.5), r(2, 1.0, 300, 0.25)])
    # weights 0.5*[.25,.75] + 0.5*[2/3,1/3] = [0.4583, 0.5417]
    np.testing.assert_allclose(s.last_weights, [0.25 / 2 + 1 / 3, 0.75 / 2 + 1 / 6])
    np.testing.assert_allclose(
        agg.to_numpy_ndarrays()[0], [0.75 / 2 + 1 / 6] * 2, rtol=1e-6
    )
    fedavg_like = PerfFedAvg(perf_alpha=0.5)
    agg2, _ = fedavg_like.aggregate_train(
        1, [r(1, 0.0, 100, None), r(2, 1.0, 300, None)]
    )
    np.testing.assert_allclose(agg2.to_numpy_ndarrays()[0], [0.75, 0.75], rtol=1e-6)
