"""The device's end of the edge link: a ClientApp mod.

It sits outside every other mod (``ClientApp(mods=[link_mod, central_dp_mod])``),
so it sees the message first and the reply last:

- **downlink**: a message that carries the model as an int8 delta
  (``keys.DOWNLINK``) is turned back into the full model from the one this
  device holds, before anything else reads it; with ``downlink-compression``
  on, every model received is kept as the one held (``device_state``);
- **uplink**: a train reply's model becomes the update from the model received,
  compressed as ``update-compression`` says (``int8``, or ``topk`` with the
  residual kept on disk and added to the next update: error feedback).

Because it is outermost, compression acts on what the other mods produced:
after DP-SGD's noise (``dp=true``: post-processing, the guarantee is unchanged)
and after central DP's client-side clipping. Quantisation noise or the
residual could push a clipped update past the bound, so with client-side
clipping the sent update is scaled back within it (what that removes stays in
the residual under top-k). Evaluate replies, feature statistics included, are
never compressed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
)
from flwr.clientapp.typing import ClientAppCallable

from apps.link_records import RecordError, pack, unpack
from fedobj import keys
from fedobj.compression import CodecError, Layout, encode_int8
from fedobj.compression.codec import encode_topk_feedback, read_update
from fedobj.compression.device_state import (
    DeviceStateError,
    load_held,
    load_residual,
    save_held,
    save_residual,
)
from fedobj.compression.quantize import seeded_rng
from fedobj.privacy import device_id, device_ledger_scope

log = logging.getLogger("fedobj.link")

CLIPPING_NORM = "clipping_norm"
"""Flower's config key for the client-side clipping bound (central DP)."""


class LinkError(ValueError):
    """The device cannot take a message as the link sent it: says why."""


def _cache_dir(node_config: Any) -> str:
    from fedobj.data.node_data import default_cache_dir

    return str(node_config.get(keys.NODE_CACHE_DIR) or default_cache_dir())


def _views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays (copies: a node holds one model; the server's
    zero-copy views live in fedobj.aggregation, whose BLAS import a ClientApp
    process would pay for nothing)."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def _error(msg: Message, reason: str) -> Message:
    log.warning("edge link: %s", reason)
    return Message(Error(code=0, reason=reason), reply_to=msg)


def link_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Decode a downlink delta, keep the held model, compress the train reply."""
    kind = msg.metadata.message_type
    config = msg.content.config_records.get(keys.CONFIG)
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or config is None:
        return call_next(msg, ctxt)
    codec = str(config.get(keys.UPDATE_COMPRESSION, "none"))
    downlink = str(config.get(keys.DOWNLINK_COMPRESSION, "none"))
    compress = kind == MessageType.TRAIN and codec != "none"
    if not compress and downlink == "none":
        return call_next(msg, ctxt)
    model_id = str(config.get(keys.LINK_MODEL, ""))
    device = device_id(ctxt.node_config)
    scope = device_ledger_scope(
        ctxt.node_config, config.get(keys.DP_LEDGER_SCOPE), ctxt.run_id
    )
    cache = _cache_dir(ctxt.node_config)
    stateful = downlink != "none" or (compress and codec == "topk")
    if stateful and device is None:
        return _error(
            msg,
            "the edge link keeps state per device (top-k's residual, the held "
            "model): set node config `device-id` on this SuperNode",
        )
    try:
        if keys.DOWNLINK in msg.content.array_records:
            assert device is not None
            arrays = _apply_downlink(msg, config, cache, device, scope)
            del msg.content[keys.DOWNLINK]
            msg.content[keys.ARRAYS] = ArrayRecord(
                {k: Array(v) for k, v in arrays.items()}
            )
        received = _views(msg.content.array_records[keys.ARRAYS])
        if downlink != "none" and device is not None:
            save_held(cache, device, scope, model_id, received)
    except (LinkError, CodecError, RecordError, DeviceStateError, KeyError) as exc:
        return _error(msg, f"downlink model unusable: {exc}")
    layout = Layout.of(received)
    flat_in = layout.flatten(received) if compress else None
    del received
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    link = ConfigRecord()
    if downlink != "none":
        link["held"] = model_id
    if flat_in is not None and _has_update(reply):
        try:
            arrays = _compress(
                reply, config, codec, layout, flat_in, device, scope, cache
            )
        except DeviceStateError as exc:
            return _error(msg, str(exc))
        del reply.content[keys.ARRAYS]
        reply.content[keys.DELTA] = pack(arrays)
        link["codec"] = codec
        link["base"] = model_id
        link["layout"] = layout.digest
    if len(link):
        reply.content[keys.LINK] = link
    return reply


def _has_update(reply: Message) -> bool:
    """A train reply with a model and examples (a 0-example reply is refused
    by the server anyway; compressing it would spend the residual)."""
    if keys.ARRAYS not in reply.content.array_records:
        return False
    metrics = reply.content.metric_records.get(keys.METRICS)
    n = metrics.get(keys.NUM_EXAMPLES) if metrics is not None else None
    return isinstance(n, (int, float)) and n > 0


def _apply_downlink(
    msg: Message, config: ConfigRecord, cache: str, device: str, scope: str | None
) -> dict[str, np.ndarray]:
    """The published model: the held one plus the int8 deltas the message
    carries, applied in order as the server applied them (``apps.link``)."""
    base = str(config.get(keys.DOWNLINK_BASE, ""))
    held = load_held(cache, device, scope)
    if held is None or held[0] != base:
        have = held[0] if held is not None else "no model"
        raise LinkError(
            f"the server sent deltas from model {base!r}, this device holds {have}"
        )
    layout = Layout.of(held[1])
    record = msg.content.array_records[keys.DOWNLINK]
    arrays = unpack(record, (layout.size * 5 + 1024) * max(1, len(record) // 2))
    flat = layout.flatten(held[1])
    for i in range(len(arrays) // 2):
        step = {"q": arrays[f"q{i}"], "scale": arrays[f"scale{i}"]}
        flat = layout.flatten(
            layout.unflatten(flat + read_update(step, "int8", layout).dense(layout))
        )
    return layout.unflatten(flat)


def _compress(
    reply: Message,
    config: ConfigRecord,
    codec: str,
    layout: Layout,
    flat_in: np.ndarray,
    device: str | None,
    scope: str | None,
    cache: str,
) -> dict[str, np.ndarray]:
    """The reply's update from the received model, as the codec's arrays."""
    trained = _views(reply.content.array_records[keys.ARRAYS])
    delta = layout.flatten(trained)
    delta -= flat_in
    model_id = str(config.get(keys.LINK_MODEL, ""))
    rng = seeded_rng(model_id, device or reply.metadata.src_node_id, codec)
    limit = config.get(CLIPPING_NORM)
    bound = float(limit) if isinstance(limit, (int, float)) else None
    if codec == "int8":
        return encode_int8(delta, layout, rng, bound)
    assert device is not None
    fraction = float(config.get(keys.TOPK_FRACTION, 0.1))
    residual = load_residual(cache, device, scope, layout)
    arrays, residual = encode_topk_feedback(
        delta, residual, layout, fraction, rng, bound
    )
    save_residual(cache, device, scope, layout, residual)
    return arrays
