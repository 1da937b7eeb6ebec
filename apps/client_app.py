"""The ClientApp: train and evaluate the broadcast model on this node's own images.

Everything heavy lives in ``fedobj``; this module reads the message, finds the node's
data (cached per process), and packs the reply.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from apps.central_dp import central_dp_mod
from apps.link_node import link_mod
from apps.records import get_model_context, load_arrays, model_to_arrays
from apps.secagg_client import secaggplus_route_mod
from fedobj import keys
from fedobj.allocator import retain_freed_memory
from fedobj.calibration import feature_stats
from fedobj.classmap import ClassMap
from fedobj.config import PrivacyConfig, RunConfig
from fedobj.data.fashion_mnist import ImageArrays
from fedobj.data.node_data import default_cache_dir, load_node_data
from fedobj.errors import FedObjError
from fedobj.model.factory import ModelArgs, build_model, head_keys
from fedobj.privacy import (
    ACCOUNTANT,
    PrivacyLedger,
    PrivacyLedgerError,
    device_id,
    device_ledger_scope,
)
from fedobj.train import (
    DpSettings,
    MappedData,
    TrainConfig,
    dp_plan,
    evaluate,
    map_to_class_map,
    to_input,
    train,
    train_private,
)

log = logging.getLogger("fedobj.client")
# outermost, the edge link (apps/link_node.py): it decodes the model first and
# compresses the reply last, after DP-SGD's noise and central DP's clipping;
# then central DP: equal weights, and client-side clipping when asked for
app = ClientApp(mods=[link_mod, central_dp_mod])


@functools.lru_cache(maxsize=1)
def _set_threads(n: int) -> None:
    # Ray gives each ClientApp `client-resources-num-cpus` cores; torch would otherwise
    # start one thread per machine core in every actor and oversubscribe the CPU.
    torch.set_num_threads(n)
    # and keep freed activation buffers in the heap (fedobj/allocator.py: a
    # training step 10-15% faster with glibc's malloc)
    retain_freed_memory()


def _prepare(
    msg: Message, context: Context
) -> tuple[RunConfig, ModelArgs, ClassMap, torch.nn.Module]:
    cfg = RunConfig.from_flower(context.run_config)
    _set_threads(cfg.training.client_threads)
    config = msg.content.config_records[keys.CONFIG]
    args, class_map = get_model_context(config)
    model = build_model(args)
    load_arrays(model, msg.content.array_records[keys.ARRAYS])
    return cfg, args, class_map, model


def _node_data(
    cfg: RunConfig, args: ModelArgs, context: Context, class_map: ClassMap
) -> tuple[MappedData, MappedData]:
    sim = cfg.simulation
    data = load_node_data(
        context.node_config,
        partitioner=sim.partitioner,
        alpha=sim.dirichlet_alpha,
        classes_per_node=sim.classes_per_node,
        eval_fraction=cfg.evaluation.eval_fraction,
        seed=cfg.training.seed,
        dataset_dir=sim.dataset_dir,
        channels=args.in_channels,
        size=args.image_size,
        split=cfg.data_split,
    )
    return _mapped(data.train, class_map), _mapped(data.eval, class_map)


# Mapping copies the images once; ImageArrays hash by identity, and the node's
# arrays are themselves cached, so this runs once per (node, class map) per process.
@functools.lru_cache(maxsize=16)
def _mapped(data: ImageArrays, class_map: ClassMap) -> MappedData:
    return map_to_class_map(data, class_map)


# secagg=true: SecAgg+ stage messages go through Flower's secaggplus_mod
@app.train(mods=[secaggplus_route_mod])
def train_fn(msg: Message, context: Context) -> Message:
    cfg, _args, class_map, model = _prepare(msg, context)
    config = msg.content.config_records[keys.CONFIG]
    try:
        train_data, eval_data = _node_data(cfg, _args, context, class_map)
    except NODE_DATA_ERRORS as exc:
        return _data_error(msg, exc)
    server_round = int(config.get(keys.SERVER_ROUND, 1))
    t = cfg.training
    tcfg = TrainConfig(
        epochs=t.local_epochs,
        batch_size=t.batch_size,
        lr=float(config.get(keys.LR, t.lr)),
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=float(config.get(keys.PROXIMAL_MU, 0.0)),
        seed=train_seed(t.seed, server_round, context.node_config, context.node_id),
        distill_classes=int(config.get(keys.DISTILL_CLASSES, 0)),
        distill_weight=cfg.growth.distill_weight,
    )
    # evaluate-on-arrival: the received model scored before it trains (the
    # round's federated evaluation, without a message of its own)
    arrival = (
        _arrival_metrics(model, eval_data, class_map)
        if config.get(keys.EVALUATE_FIRST)
        else {}
    )
    if cfg.privacy.dp:
        reply = _train_private(
            msg, context, cfg.privacy, tcfg, model, train_data, class_map
        )
        if not reply.has_error():
            reply.content.metric_records[keys.METRICS].update(arrival)
        return reply
    # the model as received is the teacher: the previous global model (LwF)
    teacher = copy.deepcopy(model) if tcfg.distill_classes > 0 else None
    if len(train_data.tensors) == 0:
        # nothing of this node's is in the catalog (yet): say so, do not fail; the
        # server drops the reply (0 examples) and counts it as rejected
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: 0,
                keys.IGNORED_EXAMPLES: sum(train_data.ignored.values()),
                **arrival,
            }
        )
        content = RecordDict(
            {
                keys.ARRAYS: model_to_arrays(model),
                keys.METRICS: metrics,
                keys.IGNORED_LABELS: ConfigRecord(dict(train_data.ignored)),
            }
        )
        return Message(content=content, reply_to=msg)
    result = train(model, train_data.tensors, tcfg, class_map.active_indices, teacher)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: len(train_data.tensors),
            keys.TRAIN_LOSS: result.loss,
            keys.TRAIN_ACCURACY: result.accuracy,
            keys.TRAIN_SECONDS: result.seconds,
            keys.IGNORED_EXAMPLES: sum(train_data.ignored.values()),
            **arrival,
        }
    )
    if t.strategy == "perffedavg":  # it weighs nodes by their local accuracy;
        # nothing else reads it, and it costs ~5% of a node's round
        local = evaluate(model, eval_data.tensors, class_map.active_indices)
        if local.num_examples:
            metrics[keys.LOCAL_ACCURACY] = local.accuracy
    content = RecordDict(
        {
            keys.ARRAYS: model_to_arrays(model),
            keys.METRICS: metrics,
            keys.LABEL_HISTOGRAM: ConfigRecord(dict(train_data.histogram)),
            keys.IGNORED_LABELS: ConfigRecord(dict(train_data.ignored)),
        }
    )
    return Message(content=content, reply_to=msg)


def _arrival_metrics(
    model: torch.nn.Module, eval_data: MappedData, class_map: ClassMap
) -> dict[str, float]:
    """The received model's held-out loss and accuracy, for the train reply."""
    result = evaluate(model, eval_data.tensors, class_map.active_indices)
    return {
        keys.EVAL_EXAMPLES: result.num_examples,
        keys.EVAL_LOSS: result.loss if result.num_examples else 0.0,
        keys.EVAL_ACCURACY: result.accuracy,
    }


def train_seed(
    seed: int, server_round: int, node_config: Mapping[str, Any], node_id: int
) -> int:
    """The seed of one node's training in one round.

    Keyed by the node's stable identity (``device_id``: the partition id in
    simulation) rather than Flower's node id, which is drawn afresh in every
    run: with the node id, two runs of one ``seed`` shuffled differently and
    were not repeatable. A node without a stable identity falls back to it.
    """
    device = device_id(node_config)
    node = device if device is not None else f"node-{node_id}"
    # a hash, not a sum: seed + round + node offsets collided across rounds
    digest = hashlib.blake2b(f"{seed}/{server_round}/{node}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1  # torch takes < 2**63


def _train_private(
    msg: Message,
    context: Context,
    cfg: PrivacyConfig,
    tcfg: TrainConfig,
    model: torch.nn.Module,
    train_data: MappedData,
    class_map: ClassMap,
) -> Message:
    """DP-SGD within the device's budget, or a reply that declines and says why."""
    device = device_id(context.node_config)
    if device is None:
        return _decline(msg, "dp=true needs node config `device-id` on this device")
    cache = str(context.node_config.get(keys.NODE_CACHE_DIR) or default_cache_dir())
    sent = msg.content.config_records[keys.CONFIG].get(keys.DP_LEDGER_SCOPE)
    scope = device_ledger_scope(context.node_config, sent, context.run_id)
    try:
        ledger = PrivacyLedger.load(cache, device, scope)
    except PrivacyLedgerError as exc:
        return _decline(msg, str(exc))
    if len(train_data.tensors) == 0:
        return _decline(msg, "no training images in the catalog's categories")
    rate, steps = dp_plan(len(train_data.tensors), tcfg)
    spent = ledger.epsilon(cfg.dp_delta)
    after = ledger.epsilon_after(cfg.dp_noise_multiplier, rate, steps, cfg.dp_delta)
    if after > cfg.dp_epsilon:
        return _decline(
            msg,
            f"DP budget: this round would bring epsilon to {after:.3f} > "
            f"dp-epsilon {cfg.dp_epsilon} (spent {spent:.3f} at delta "
            f"{cfg.dp_delta}, device {device})",
        )
    run = train_private(
        model,
        train_data.tensors,
        tcfg,
        DpSettings(
            cfg.dp_noise_multiplier, cfg.dp_max_grad_norm, cfg.dp_grad_sample_mode
        ),
        class_map.active_indices,
    )
    ledger.record(cfg.dp_noise_multiplier, run.sample_rate, run.steps)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: len(train_data.tensors),
            keys.TRAIN_SECONDS: run.result.seconds,
            keys.DP_EPSILON: ledger.epsilon(cfg.dp_delta),
            keys.DP_DELTA: cfg.dp_delta,
            keys.DP_NOISE_MULTIPLIER: cfg.dp_noise_multiplier,
            keys.DP_SAMPLE_RATE: run.sample_rate,
            keys.DP_STEPS: run.steps,
        }
    )
    content = RecordDict(
        {
            keys.ARRAYS: model_to_arrays(model),
            keys.METRICS: metrics,
            # no label histogram, no held-out accuracy, no training loss or
            # accuracy: computed on the private images without noise, they would
            # leak what DP-SGD protects; the server is told what was withheld
            keys.DP: ConfigRecord(
                {
                    "accountant": ACCOUNTANT,
                    "device-id": device,
                    "withheld": (
                        "label-histogram, local-accuracy, train-loss, train-accuracy"
                    ),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def _decline(msg: Message, reason: str) -> Message:
    log.warning("declining round: %s", reason)
    return Message(Error(code=0, reason=reason), reply_to=msg)


NODE_DATA_ERRORS = (FedObjError, OSError)
"""What reading a device's data raises: a ``data-dir`` that is missing, not a
folder or holds no usable image (``fedobj.errors``), or unreadable (OSError)."""


def _data_error(msg: Message, exc: Exception) -> Message:
    """Reply with an error that says why this node's data cannot be used.

    Flower would turn the exception into an error reply too, but with a
    traceback and ``<class '...'>`` as the reason; this one names the problem.
    The server logs it with the node id, counts the node as failed and goes on.
    """
    reason = f"node data unusable: {exc}"
    log.error("%s", reason)
    return Message(Error(code=0, reason=reason), reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    cfg, args, class_map, model = _prepare(msg, context)
    try:
        train_data, eval_data = _node_data(cfg, args, context, class_map)
    except NODE_DATA_ERRORS as exc:
        return _data_error(msg, exc)
    result = evaluate(model, eval_data.tensors, class_map.active_indices)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: result.num_examples,
            keys.EVAL_LOSS: result.loss if result.num_examples else 0.0,
            keys.EVAL_ACCURACY: result.accuracy,
        }
    )
    content = RecordDict({keys.METRICS: metrics})
    config = msg.content.config_records[keys.CONFIG]
    private = cfg.privacy.private_updates or cfg.secagg.secagg
    if private and config.get(keys.FEATURE_STATS):
        log.warning("feature statistics not sent: this run is private")
    elif config.get(keys.FEATURE_STATS) and len(train_data.tensors) > 0:
        # head calibration (CCVR): the features of the model being evaluated,
        # the round's aggregate, over this node's training images
        data = train_data.tensors
        stats = feature_stats(
            model,
            to_input(data.images),
            data.labels,
            head_keys(args)[0],
            class_map.num_classes,
        )
        content[keys.FEATURE_STATS_ARRAYS] = ArrayRecord(
            {k: Array(v) for k, v in stats.items()}
        )
    return Message(content=content, reply_to=msg)
