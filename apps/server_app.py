"""The ServerApp: federated training of a fedobj model on Flower's Message API.

Per round it leaves a checkpoint, a metrics row per round and per node, and one log
line a person can follow; at the end a summary and a PNG. All paths are resolved to
absolute ones and logged once, because this process does not run in the user's shell.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from apps.records import load_arrays, model_to_arrays
from apps.strategy import RoundRecord, RunStrategy, make_inner_strategy
from fedobj import keys
from fedobj.classmap import ClassMap
from fedobj.config import RunConfig
from fedobj.data.categories import fashion_mnist_class_map
from fedobj.data.node_data import load_test_set
from fedobj.errors import FedObjError
from fedobj.model.checkpoint import Checkpoint, save_checkpoint
from fedobj.model.factory import ModelArgs, build_model
from fedobj.outputs import (
    RunOutputs,
    code_revision,
    package_versions,
    write_json_atomic,
)
from fedobj.train import LabelledTensors, evaluate, map_to_class_map

log = logging.getLogger("fedobj.server")
app = ServerApp()


def _setup_logging() -> None:
    """fedobj's own lines go to stderr, which Flower streams with ``--stream``."""
    logger = logging.getLogger("fedobj")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedobj: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def wait_for_nodes(
    grid: Grid, minimum: int, settle_s: float = 2.0, max_wait_s: float = 60.0
) -> int:
    """Wait until at least ``minimum`` nodes are connected and the count is stable.

    Flower samples from the nodes connected *now*; right after start-up not all
    simulated nodes are registered, and round 1 would train on a subset.
    """
    deadline = time.monotonic() + max_wait_s
    count, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
        elif count >= minimum and time.monotonic() - stable_since >= settle_s:
            break
        time.sleep(0.25)
    return count


class CentralEvaluator:
    """Evaluates the global model on Fashion-MNIST's test split (the server's data)."""

    def __init__(self, cfg: RunConfig, args: ModelArgs, class_map: ClassMap) -> None:
        test = load_test_set(cfg.dataset_dir, args.in_channels, args.image_size)
        self.data: LabelledTensors = map_to_class_map(test, class_map).tensors
        self.model = build_model(args)
        self.active = class_map.active_indices

    def __call__(self, arrays: ArrayRecord) -> tuple[float, float, dict[int, float]]:
        load_arrays(self.model, arrays)
        res = evaluate(self.model, self.data, self.active)
        return res.loss, res.accuracy, res.per_class_accuracy


def _mean(results: list[dict[str, float]], key: str) -> float | None:
    pairs = [(r[key], r.get(keys.NUM_EXAMPLES, 0.0)) for r in results if key in r]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    try:
        run(grid, context)
    except FedObjError as exc:
        log.error("%s", exc)
        raise


def run(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    run_id = str(context.run_id)
    torch.manual_seed(cfg.seed)
    class_map = fashion_mnist_class_map()
    args = ModelArgs(
        cfg.model, class_map.num_classes, cfg.in_channels, cfg.image_size, cfg.norm
    )
    model = build_model(args, cfg.pretrained_path or None)
    central = CentralEvaluator(cfg, args, class_map) if cfg.central_eval else None

    outputs = RunOutputs.create(cfg.resolve_outputs_dir(), run_id)
    log.info("run %s: outputs in %s", run_id, outputs.root)
    outputs.write_run_info(
        {
            "run_id": run_id,
            "run_config": cfg.to_flower(),
            "seed": cfg.seed,
            "code_revision": code_revision(),
            "packages": package_versions(),
            "model_args": args.to_dict(),
            "class_map": class_map.to_dict(),
            "outputs_dir": str(outputs.root),
            "started": time.time(),
        }
    )

    strategy = RunStrategy(
        make_inner_strategy(cfg),
        args,
        class_map,
        lr_fn=cfg.lr_at,
    )
    n_nodes = wait_for_nodes(grid, cfg.min_nodes)
    log.info(
        "%d nodes connected; %d rounds of %s on %s (%d classes)",
        n_nodes,
        cfg.num_server_rounds,
        cfg.strategy,
        cfg.model,
        class_map.num_classes,
    )
    t_start = time.time()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        loss = acc = None
        per_class: dict[int, float] = {}
        if central is not None:
            loss, acc, per_class = central(arrays)
        if server_round == 0:
            log.info(
                "round 0 (initial model): central accuracy %s",
                "n/a" if acc is None else f"{acc:.4f}",
            )
            return (
                None if acc is None else MetricRecord({"accuracy": acc, "loss": loss})
            )
        _record_round(
            outputs,
            strategy.rounds[server_round],
            arrays,
            args,
            class_map,
            loss,
            acc,
            per_class,
            cfg.num_server_rounds,
        )
        return None if acc is None else MetricRecord({"accuracy": acc, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=model_to_arrays(model),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    _finish(outputs, time.time() - t_start)


def _record_round(
    outputs: RunOutputs,
    rec: RoundRecord,
    arrays: ArrayRecord,
    args: ModelArgs,
    class_map: ClassMap,
    loss: float | None,
    acc: float | None,
    per_class: dict[int, float],
    num_rounds: int,
) -> None:
    r = rec.server_round
    metrics = {"central_accuracy": acc, "central_loss": loss}
    save_checkpoint(
        Checkpoint(
            args,
            class_map,
            arrays.to_torch_state_dict(),
            round=r,
            metrics={k: v for k, v in metrics.items() if v is not None},
            extra={
                "run_id": outputs.run_id,
                "per_class_accuracy": {str(k): v for k, v in per_class.items()},
            },
        ),
        outputs.checkpoint_path(r),
    )
    ok_train = [n.metrics for n in rec.train if n.error is None]
    ok_eval = [n.metrics for n in rec.evaluate if n.error is None]
    for kind, results, loss_key, acc_key in (
        ("node-train", rec.train, keys.TRAIN_LOSS, keys.TRAIN_ACCURACY),
        ("node-evaluate", rec.evaluate, keys.EVAL_LOSS, keys.EVAL_ACCURACY),
    ):
        for n in results:
            m = n.metrics
            outputs.add_row(
                round=r,
                kind=kind,
                node_id=str(n.node_id),
                num_examples=int(m.get(keys.NUM_EXAMPLES, 0))
                if n.error is None
                else None,
                loss=m.get(loss_key),
                accuracy=m.get(acc_key),
                seconds=m.get(keys.TRAIN_SECONDS),
                ignored_examples=int(m[keys.IGNORED_EXAMPLES])
                if keys.IGNORED_EXAMPLES in m
                else None,
            )
    seconds = time.time() - rec.started
    failed = sum(1 for n in rec.train if n.error is not None)
    outputs.add_row(
        round=r,
        kind="round",
        num_examples=int(sum(m.get(keys.NUM_EXAMPLES, 0) for m in ok_train)),
        loss=_mean(ok_eval, keys.EVAL_LOSS),
        accuracy=_mean(ok_eval, keys.EVAL_ACCURACY),
        central_loss=loss,
        central_accuracy=acc,
        nodes_sampled=rec.sampled,
        nodes_replied=len(ok_train),
        nodes_failed=failed,
        lr=rec.lr,
        seconds=seconds,
    )
    outputs.flush()
    train_loss = _mean(ok_train, keys.TRAIN_LOSS)
    log.info(
        "round %d/%d: %d/%d nodes replied%s, train loss %s, central accuracy %s "
        "(loss %s), %.1f s",
        r,
        num_rounds,
        len(ok_train),
        rec.sampled,
        f" ({failed} failed)" if failed else "",
        "n/a" if train_loss is None else f"{train_loss:.4f}",
        "n/a" if acc is None else f"{acc:.4f}",
        "n/a" if loss is None else f"{loss:.4f}",
        seconds,
    )
    for n in rec.train:
        if n.error is not None:
            log.warning("round %d: node %d failed: %s", r, n.node_id, n.error)


def _finish(outputs: RunOutputs, seconds: float) -> None:
    rounds = outputs.round_rows()
    last = rounds[-1] if rounds else {}
    png = outputs.plot() if rounds else None
    summary = {
        "run_id": outputs.run_id,
        "rounds": len(rounds),
        "final_central_accuracy": last.get("central_accuracy"),
        "final_federated_accuracy": last.get("accuracy"),
        "best_central_accuracy": max(
            (
                r["central_accuracy"]
                for r in rounds
                if r["central_accuracy"] is not None
            ),
            default=None,
        ),
        "seconds": seconds,
        "outputs_dir": str(outputs.root),
        "final_checkpoint": str(outputs.checkpoint_path(len(rounds)))
        if rounds
        else None,
        "plot": str(png) if png else None,
    }
    write_json_atomic(Path(outputs.root) / "summary.json", summary)
    acc = summary["final_central_accuracy"]
    log.info(
        "done in %.0f s: final central accuracy %s; outputs in %s",
        seconds,
        "n/a" if acc is None else f"{acc:.4f}",
        outputs.root,
    )
