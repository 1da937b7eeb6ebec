"""plainfl: the ClientApp, in the shape of quickstart-pytorch's.

Per message: build the model, load the received weights, get this node's loaders
(data cached per process in ``task``; on a SuperNode, the ``data-dir`` image
folder read with torchvision's ``ImageFolder``), train or test, reply. The one
setting added to quickstart's is the torch thread count, set exactly as fedobj's
ClientApp sets it (``client-threads``, default 1): Ray gives each ClientApp one
CPU, and torch would otherwise start a thread per core in every actor.
"""

from __future__ import annotations

from typing import cast

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from plainfl.task import DataSpec, Net, load_data, load_folder_data
from plainfl.task import test as test_fn
from plainfl.task import train as train_fn

app = ClientApp()


def _spec(context: Context) -> DataSpec:
    cfg = context.run_config
    return DataSpec(
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
        alpha=float(cfg["dirichlet-alpha"]),
        seed=int(cfg["seed"]),
        eval_fraction=float(cfg["eval-fraction"]),
        dataset_dir=str(cfg["dataset-dir"]),
    )


def _loaders(
    context: Context, shuffle_seed: int
) -> tuple[DataLoader[tuple[torch.Tensor, int]], DataLoader[tuple[torch.Tensor, int]]]:
    """Train and held-out loaders: a SuperNode's ``data-dir`` image folder
    (deployment, as fedobj reads it), else the simulated partition."""
    cfg = context.run_config
    batch_size = int(cfg["batch-size"])
    if context.node_config.get("data-dir"):
        return load_folder_data(
            str(context.node_config["data-dir"]),
            batch_size,
            shuffle_seed,
            float(cfg["eval-fraction"]),
            int(cfg["seed"]),
        )
    return load_data(_spec(context), batch_size, shuffle_seed)


def _model(msg: Message, context: Context) -> torch.nn.Module:
    torch.set_num_threads(int(context.run_config["client-threads"]))
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the model on local data."""
    model = _model(msg, context)
    cfg = context.run_config
    config = msg.content.config_records["config"]
    server_round = int(cast(int, config["server-round"]))
    # fedobj's per-node, per-round shuffle seed, so the sample orders match
    shuffle_seed = int(cfg["seed"]) * 100_003 + server_round * 1009
    shuffle_seed += context.node_id % 1000
    trainloader, _ = _loaders(context, shuffle_seed)
    result = train_fn(
        model,
        trainloader,
        int(cfg["local-epochs"]),
        float(cast(float, config["lr"])),
        float(cfg["momentum"]),
        float(cfg["weight-decay"]),
    )
    metrics: dict[str, int | float] = {
        "train_loss": result.loss,
        "train-seconds": result.seconds,  # not quickstart's: for the bench's split
        "num-examples": len(trainloader.dataset),  # type: ignore[arg-type]
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(dict(metrics)),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model on local (held-out) data."""
    model = _model(msg, context)
    _, valloader = _loaders(context, 0)
    eval_loss, eval_acc = test_fn(model, valloader)
    metrics: dict[str, int | float] = {
        "eval_loss": eval_loss,
        "eval_acc": eval_acc,
        "num-examples": len(valloader.dataset),  # type: ignore[arg-type]
    }
    return Message(
        content=RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg
    )
