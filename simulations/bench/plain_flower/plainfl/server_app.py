"""plainfl: the ServerApp, quickstart-pytorch's with fedobj's settings.

Flower's own ``FedAvg`` and ``strategy.start(..., evaluate_fn=...)`` own the round
loop. Differences from quickstart, each to match what fedobj does:

* the learning rate follows fedobj's cosine schedule per round (quickstart sends one
  fixed ``lr`` in ``train_config``); ``configure_train`` adds it, the way FedProx
  adds ``proximal-mu``;
* ``min_train_nodes = min_available_nodes = min-nodes`` (full participation from
  round 1) and ``min_evaluate_nodes = 2``, as fedobj's strategy sets them;
* the initial model is drawn after ``torch.manual_seed(seed)``, as fedobj draws it;
* the centralised evaluation skips round 0 (fedobj does not evaluate the untrained
  model), and logs one line per round that the benchmarks parse (with the mean
  and the slowest node's training seconds: deploy_rounds.py subtracts the
  slowest from the round).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedobj.train import lr_for_round
from plainfl.task import Net, load_centralized_dataset, test

app = ServerApp()


def _number(record: MetricRecord, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) else float("nan")


class ScheduledFedAvg(FedAvg):
    """FedAvg that sends each round's learning rate and remembers the train stats."""

    def __init__(self, lr_at: Callable[[int], float], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lr_at = lr_at
        self.last_train: dict[str, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["lr"] = self.lr_at(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        secs = [
            _number(m.content.metric_records["metrics"], "train-seconds") for m in ok
        ]
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.last_train = {
            "replied": len(ok),
            "sampled": len(replies),
            "node_train_s": sum(secs) / len(secs) if secs else float("nan"),
            "node_train_max_s": max(secs) if secs else float("nan"),
            "loss": _number(metrics, "train_loss") if metrics else float("nan"),
        }
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    min_nodes = int(cfg["min-nodes"])
    horizon = int(cfg["lr-schedule-rounds"]) or num_rounds
    lr, lr_min = float(cfg["lr"]), float(cfg["lr-min"])
    dataset_dir = str(cfg["dataset-dir"])

    torch.manual_seed(int(cfg["seed"]))
    arrays = ArrayRecord(Net().state_dict())

    strategy = ScheduledFedAvg(
        lr_at=lambda r: lr_for_round(lr, r, horizon, lr_min=lr_min),
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min(min_nodes, 2),
        min_available_nodes=min_nodes,
    )
    model = Net()
    testloader = load_centralized_dataset(dataset_dir)
    mark = [time.time()]

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate on the 10,000 test images; one parseable log line per round."""
        if server_round == 0:
            mark[0] = time.time()
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = test(model, testloader)
        now, t = time.time(), strategy.last_train
        log(
            INFO,
            "plainfl: round %d/%d: %d/%d nodes replied, train loss %.4f, "
            "central accuracy %.4f (loss %.4f), lr %.5f, node train %.2f s "
            "(slowest %.2f s), %.1f s",
            server_round,
            num_rounds,
            t.get("replied", 0),
            t.get("sampled", 0),
            t.get("loss", float("nan")),
            acc,
            loss,
            strategy.lr_at(server_round),
            t.get("node_train_s", float("nan")),
            t.get("node_train_max_s", float("nan")),
            now - mark[0],
        )
        mark[0] = now
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )
