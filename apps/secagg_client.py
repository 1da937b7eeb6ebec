"""Node side of SecAgg+: Flower's ``secaggplus_mod`` around our own train handler.

Flower 1.41's ``secaggplus_mod`` speaks the legacy record format: in its
"collect masked vectors" stage it passes on a ``fitins.*`` message and expects a
``fitres.*`` reply (parameters as an unnamed list, ``num_examples``, metrics). Our
``@app.train()`` handler speaks the Message API (named arrays under ``arrays``, the
class map under ``config``). :func:`secaggplus_route_mod` is a function-level mod on
that handler: messages that carry SecAgg+ configs go through ``secaggplus_mod`` with
an adapter that turns the ``fitins`` message into the handler's own format and its
reply into a ``fitres`` one; every other message passes through untouched, so one
ClientApp serves runs with and without ``secagg``.

The handler trains exactly as in a plain round (same ``TrainConfig`` from the class
map and run config). What leaves the node is different: the update only masked,
the example count capped at ``secagg-max-weight`` (the true count stays in the
metrics), and no label histogram (it would tell the server what the sum hides).
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedobj import keys
from fedobj.config import RunConfig, SecAggConfig

log = logging.getLogger("fedobj.client")


class SecAggTrainError(RuntimeError):
    """The train handler could not produce an update for this SecAgg+ round.

    Raised inside the ClientApp, it becomes an error reply: the server counts the
    node as dropped, and SecAgg+ removes its masks if enough shares remain.
    """


def is_secaggplus(msg: Message) -> bool:
    """A train message that belongs to one of SecAgg+'s four stages."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secaggplus_route_mod(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Send SecAgg+ stage messages through Flower's ``secaggplus_mod``.

    ``call_next`` is our Message-API train handler; ``secaggplus_mod`` calls the
    legacy adapter around it only in the stage that trains.
    """
    if not is_secaggplus(msg):
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, legacy_train(call_next))


def legacy_train(handler: ClientAppCallable) -> ClientAppCallable:
    """Wrap a Message-API train handler to answer ``fitins`` with ``fitres``."""

    def fit(msg: Message, ctxt: Context) -> Message:
        cfg = RunConfig.from_flower(ctxt.run_config).secagg
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        names = json.loads(str(config.pop(keys.SECAGG_ARRAY_NAMES)))
        incoming = parameters_to_ndarrays(fitins.parameters)
        if len(names) != len(incoming):
            raise SecAggTrainError(
                f"{len(incoming)} arrays but {len(names)} names: server and node "
                "versions of fedobj differ?"
            )
        arrays = ArrayRecord(
            {n: Array(np.ascontiguousarray(a)) for n, a in zip(names, incoming)}
        )
        # the handler reads and answers its own format; only the content changes,
        # the metadata (who asked, which round) stays the message's own
        msg.content = RecordDict(
            {keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord(config)}  # type: ignore[arg-type]
        )
        reply = handler(msg, ctxt)
        if reply.has_error():
            raise SecAggTrainError(f"train handler failed: {reply.error.reason}")
        return Message(
            compat.fitres_to_recorddict(to_fitres(reply, names, cfg), keep_input=False),
            reply_to=msg,
        )

    return fit


def to_fitres(reply: Message, names: list[str], cfg: SecAggConfig) -> FitRes:
    """The handler's reply as Flower's legacy ``FitRes`` for ``secaggplus_mod``.

    The arrays go in the order of ``names`` (the server's), as float64, the dtype
    Flower's quantiser computes in. The weight is capped at ``secagg-max-weight``:
    above it Flower scales the update past the clipping range and the sum is
    silently wrong (apps/secagg.py); capped, the node only counts less.
    """
    content = reply.content
    received = content.array_records[keys.ARRAYS]
    if set(received) != set(names):
        raise SecAggTrainError("the trained model's arrays differ from the server's")
    ndarrays = [received[n].numpy().astype(np.float64) for n in names]
    metrics: dict[str, Scalar] = {
        k: v
        for k, v in content.metric_records[keys.METRICS].items()
        if isinstance(v, (int, float))
    }
    n = int(metrics.get(keys.NUM_EXAMPLES, 0))
    weight = min(n, int(cfg.secagg_max_weight))
    if weight < n:
        log.warning(
            "SecAgg+: %d examples > secagg-max-weight %g: this node counts as %d",
            n,
            cfg.secagg_max_weight,
            weight,
        )
    c = cfg.secagg_clipping_range
    clipped = int(sum(np.count_nonzero(np.abs(a) > c) for a in ndarrays))
    if clipped:
        log.warning(
            "SecAgg+: %d values outside secagg-clipping-range %g are clipped",
            clipped,
            c,
        )
    metrics[keys.SECAGG_CLIPPED] = clipped
    return FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(ndarrays),
        num_examples=weight,
        metrics=metrics,
    )
