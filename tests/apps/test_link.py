"""The edge link's Flower glue, in process: the server's Link and ReplyFolder,
the node's link_mod with its state on a real disk, and the records between.

Messages are copied on the way (``deepcopy``) as the SuperLink's serialisation
would: the node never shares the server's objects.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from apps.central_dp import central_dp_mod
from apps.exchange import DOWNLINK_BYTES, UPLINK_BYTES, ReplyFolder
from apps.link import Link
from apps.link_node import link_mod
from apps.link_records import RecordError, message_bytes, pack, unpack
from fedobj import keys
from fedobj.compression import Layout
from fedobj.config import RunConfig
from fedobj.errors import ConfigError
from tests.apps.helpers import instruction, set_task_identity

MODEL = {
    "conv.weight": np.random.default_rng(1).normal(size=(16, 1, 3, 3)),
    "conv.bias": np.zeros(16),
    "head.weight": np.random.default_rng(2).normal(size=(10, 144)),
    "head.bias": np.zeros(10),
}
MODEL = {k: v.astype(np.float32) for k, v in MODEL.items()}


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _server_messages(nodes: list[int], arrays: ArrayRecord) -> list[Message]:
    set_task_identity()
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({"lr": 0.1})})
    return [
        Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN)
        for n in nodes
    ]


def _step(node: int) -> float:
    return 0.01 * node


def _trainer(msg: Message, ctxt: Context) -> Message:
    """A node's training: every value moves by a node-specific step."""
    got = _numpy(msg.content.array_records[keys.ARRAYS])
    moved = {k: v + np.float32(_step(ctxt.node_id)) for k, v in got.items()}
    metrics = MetricRecord({keys.NUM_EXAMPLES: 10 * ctxt.node_id})
    return Message(
        RecordDict({keys.ARRAYS: _arrays(moved), keys.METRICS: metrics}), reply_to=msg
    )


def _deliver(message: Message, cache: Path, device: bool = True) -> Message:
    """What a node with its own cache folder answers to ``message``."""
    node = message.metadata.dst_node_id
    received = instruction(
        node, copy.deepcopy(message.content), message.metadata.message_type
    )
    config = {keys.NODE_CACHE_DIR: str(cache / str(node))}
    if device:
        config[keys.NODE_DEVICE_ID] = f"dev-{node}"
    ctxt = Context(7, node, config, RecordDict(), {})
    reply = link_mod(received, ctxt, _trainer)
    return (
        Message(copy.deepcopy(reply.content), reply_to=instruction(node))
        if not reply.has_error()
        else reply
    )


def _round(link: Link, arrays: ArrayRecord, nodes: list[int], cache: Path, label: str):
    messages = link.outgoing(_server_messages(nodes, arrays), arrays, label)
    folder = ReplyFolder(arrays, link=link)
    replies = [_deliver(m, cache) for m in messages]
    sent = [sorted(r.content.array_records) for r in replies]  # the folder drops them
    for reply in replies:
        folder(reply)
    folded, _ = folder.aggregate()
    return messages, sent, folder, folded


def _expected(nodes: list[int]) -> float:
    weights = [10 * n for n in nodes]
    return sum(w * _step(n) for w, n in zip(weights, nodes)) / sum(weights)


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_compressed_replies_fold_to_the_mean_and_cost_less(tmp_path, codec) -> None:
    nodes = [1, 2, 3]
    link = Link(codec, 0.5 if codec == "topk" else 0.1, "none")
    arrays = _arrays(MODEL)
    messages, replies, folder, folded = _round(link, arrays, nodes, tmp_path, "r1t")
    assert folder.valid_count == 3 and not folder.rejected
    assert replies == [[keys.DELTA]] * 3  # the update, not the model
    dense = message_bytes(messages[0].content)
    for outcome in folder.outcomes:
        assert outcome.metrics[UPLINK_BYTES] < dense / 3.9
    moved = {k: v - MODEL[k] for k, v in _numpy(folded).items()}
    step = _expected(nodes)
    if codec == "int8":  # every value moved by the mean step, to int8 precision
        for v in moved.values():
            np.testing.assert_allclose(v, step, atol=step / 50)
    else:  # top-k 50%: half the values moved, the rest wait on the devices
        values = np.concatenate([v.reshape(-1) for v in moved.values()])
        assert 0.3 < np.mean(np.abs(values) > step / 10) < 0.9
        assert list((tmp_path / "1").rglob("dev-1.residual.npz"))


def test_dense_strategies_get_whole_models_from_compressed_replies(tmp_path) -> None:
    link = Link("int8", 0.1, "none")
    arrays = _arrays(MODEL)
    messages = link.outgoing(_server_messages([1, 2], arrays), arrays, "r1t")
    folder = ReplyFolder(arrays, stream=False, link=link)
    for m in messages:
        folder(_deliver(m, tmp_path))
    folder.finish()
    assert len(folder.valid) == 2
    for msg in folder.valid:
        whole = _numpy(msg.content.array_records[keys.ARRAYS])
        node = msg.metadata.src_node_id
        for k, v in whole.items():
            np.testing.assert_allclose(v - MODEL[k], _step(node), atol=_step(node) / 50)
        assert list(msg.content.array_records) == [keys.ARRAYS]


def _refused(folder: ReplyFolder, node: int) -> str:
    return next(r.error for r in folder.rejected if r.node_id == node)


def test_bad_compressed_replies_are_refused_and_the_round_goes_on(tmp_path) -> None:
    link = Link("int8", 0.1, "none")
    arrays = _arrays(MODEL)
    messages = link.outgoing(_server_messages([1, 2, 3, 4, 5], arrays), arrays, "r2t")
    replies = {m.metadata.dst_node_id: _deliver(m, tmp_path) for m in messages}
    # 2: a NaN scale
    delta = unpack(replies[2].content.array_records[keys.DELTA], 1 << 30)
    bad = {k: v.copy() for k, v in delta.items()}
    bad["scale"][3] = np.nan
    replies[2].content[keys.DELTA] = pack(bad)
    # 3: an update from another class map (its layout differs)
    replies[3].content[keys.LINK]["layout"] = "0123456789abcdef"
    # 4: an update against a model this round did not send
    replies[4].content[keys.LINK]["base"] = "r1t.1"
    # 5: a dense reply in a compressed run
    del replies[5].content[keys.DELTA]
    replies[5].content[keys.ARRAYS] = _arrays(MODEL)
    folder = ReplyFolder(arrays, link=link)
    for n in sorted(replies):
        folder(replies[n])
    folded, _ = folder.aggregate()
    assert folder.valid_count == 1
    assert "finite" in _refused(folder, 2)
    assert "another class map" in _refused(folder, 3)
    assert "this round sent" in _refused(folder, 4)
    assert "not compressed" in _refused(folder, 5)
    assert all(r.failure == "invalid" for r in folder.rejected)
    moved = _numpy(folded)["head.weight"] - MODEL["head.weight"]
    np.testing.assert_allclose(moved, _step(1), atol=_step(1) / 50)  # node 1's alone


def test_int8_downlink_sends_deltas_that_land_where_the_server_computed(
    tmp_path,
) -> None:
    nodes = [1, 2]
    link = Link("int8", 0.1, "int8", seed=3)
    arrays = _arrays(MODEL)
    messages, _, _, folded = _round(link, arrays, nodes, tmp_path, "r1t")
    assert all(keys.ARRAYS in m.content.array_records for m in messages)  # whole
    assert set(link.held) == {1, 2}
    messages, replies, folder, _ = _round(link, folded, nodes, tmp_path, "r2t")
    assert folder.valid_count == 2
    full = message_bytes(RecordDict({keys.ARRAYS: folded}))
    for m in messages:
        assert keys.DOWNLINK in m.content.array_records
        assert full / message_bytes(m.content) > 3.5
    # the node holds exactly the model the server computed it would
    landed = link.models[link.sent[1]]
    for node in nodes:
        from fedobj.compression.device_state import load_held

        model_id, held = load_held(tmp_path / str(node), f"dev-{node}", None)
        assert model_id == link.sent[node]
        np.testing.assert_array_equal(landed.layout.flatten(held), landed.flat)
    # and close to the model it was sent
    np.testing.assert_allclose(
        landed.flat, Layout.of(MODEL).flatten(_numpy(folded)), atol=1e-3
    )


def test_a_node_that_lost_its_held_model_says_so_and_gets_the_whole_next_time(
    tmp_path,
) -> None:
    link = Link("none", 0.1, "int8")
    arrays = _arrays(MODEL)
    messages = link.outgoing(_server_messages([1], arrays), arrays, "r1t")
    link.note(_deliver(messages[0], tmp_path))
    messages = link.outgoing(_server_messages([1], arrays), arrays, "r2t")
    assert keys.DOWNLINK in messages[0].content.array_records
    for path in (tmp_path / "1").rglob("*.held.npz"):
        path.unlink()
    reply = _deliver(messages[0], tmp_path)
    assert reply.has_error() and "holds no model" in reply.error.reason
    link.note(reply)
    messages = link.outgoing(_server_messages([1], arrays), arrays, "r3t")
    assert keys.ARRAYS in messages[0].content.array_records


def test_stateful_modes_need_a_device_identity(tmp_path) -> None:
    link = Link("topk", 0.1, "none")
    arrays = _arrays(MODEL)
    message = link.outgoing(_server_messages([1], arrays), arrays, "r1t")[0]
    reply = _deliver(message, tmp_path, device=False)
    assert reply.has_error() and "device-id" in reply.error.reason


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_client_side_clipping_bounds_the_update_actually_sent(tmp_path, codec) -> None:
    """Quantisation noise, or top-k's residual added back, would take the sent
    update past central DP's bound; it is scaled back within it, every round."""
    link = Link(codec, 0.3, "none")
    arrays = _arrays(MODEL)
    ctxt = Context(
        7,
        3,
        {keys.NODE_DEVICE_ID: "d", keys.NODE_CACHE_DIR: str(tmp_path)},
        RecordDict(),
        {},
    )
    norms = []
    for label in ("r1t", "r2t", "r3t"):
        message = link.outgoing(_server_messages([3], arrays), arrays, label)[0]
        config = message.content.config_records[keys.CONFIG]
        config[keys.CENTRAL_DP] = "client-fixed"
        config["clipping_norm"] = 0.05  # the dense update's norm is about 0.9
        node = instruction(3, copy.deepcopy(message.content))
        reply = link_mod(node, ctxt, lambda m, c: central_dp_mod(m, c, _trainer))
        folder = ReplyFolder(arrays, stream=False, link=link)
        folder(Message(copy.deepcopy(reply.content), reply_to=instruction(3)))
        whole = _numpy(folder.valid[0].content.array_records[keys.ARRAYS])
        norms.append(
            np.sqrt(sum(float(((whole[k] - MODEL[k]) ** 2).sum()) for k in MODEL))
        )
    assert max(norms) <= 0.05 + 1e-6, norms
    if codec == "int8":
        assert min(norms) > 0.04, norms
    else:  # the residual brings later rounds up to the bound
        assert norms[0] < 0.04 and norms[-1] > 0.049, norms


def test_records_are_bounded_when_read() -> None:
    record = pack({"q": np.zeros(1000, np.int8)})
    assert unpack(record, 1000)["q"].size == 1000
    with pytest.raises(RecordError, match="more than"):
        unpack(record, 999)
    lying = ArrayRecord(
        {"q": Array(dtype="int8", shape=(10,), stype="zstd", data=record["q"].data)}
    )
    with pytest.raises(RecordError, match="its shape"):
        unpack(lying, 1 << 20)
    with pytest.raises(RecordError, match="numpy.ndarray"):
        unpack(ArrayRecord({"q": Array(np.zeros(3, np.int8))}), 1 << 20)
    with pytest.raises(RecordError, match="dtype"):
        unpack(
            ArrayRecord(
                {"q": Array(dtype="object", shape=(1,), stype="zstd", data=b"x")}
            ),
            1 << 20,
        )


def test_train_outcomes_carry_both_directions_bytes_in_plain_runs_too() -> None:
    link = Link("none", 0.1, "none")
    arrays = _arrays(MODEL)
    messages = link.outgoing(_server_messages([1], arrays), arrays, "r1t")
    assert keys.LINK_MODEL not in messages[0].content.config_records[keys.CONFIG]
    folder = ReplyFolder(arrays, link=link)
    set_task_identity()
    reply = _trainer(
        instruction(1, copy.deepcopy(messages[0].content)),
        Context(7, 1, {}, RecordDict(), {}),
    )
    folder(Message(reply.content, reply_to=instruction(1)))
    assert folder.outcomes[0].metrics[UPLINK_BYTES] > 4 * sum(
        v.size for v in MODEL.values()
    )
    assert DOWNLINK_BYTES == "downlink-bytes"


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"update-compression": "int8"}, "update-compression"),
        ({"update-compression": "topk"}, "update-compression"),
        ({"downlink-compression": "int8"}, "downlink-compression"),
    ],
)
def test_secagg_with_compression_is_refused_before_round_one(extra, key) -> None:
    with pytest.raises(ConfigError, match=f"`{key}`.*SecAgg"):
        RunConfig.from_flower({"secagg": True, "min-nodes": 3, **extra})


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"update-compression": "zip"}, "update-compression"),
        ({"topk-fraction": 0.0}, "topk-fraction"),
        ({"topk-fraction": 0.8}, "topk-fraction"),
        ({"downlink-compression": "topk"}, "downlink-compression"),
    ],
)
def test_bad_link_values_are_refused(extra, key) -> None:
    with pytest.raises(ConfigError, match=f"`{key}`"):
        RunConfig.from_flower(extra)


def test_the_link_is_the_outermost_mod() -> None:
    """Outermost, it compresses what DP-SGD's noise and central DP's clipping
    produced (post-processing), and decodes before any other mod reads."""
    import apps.client_app as client

    assert client.app._mods[:2] == [link_mod, central_dp_mod]


def test_after_head_growth_the_downlink_sends_the_whole_model(tmp_path) -> None:
    link = Link("int8", 0.1, "int8")
    arrays = _arrays(MODEL)
    _round(link, arrays, [1], tmp_path, "r1t")
    grown = dict(MODEL)
    grown["head.weight"] = np.concatenate(
        [MODEL["head.weight"], MODEL["head.weight"][:1]]
    )
    grown["head.bias"] = np.zeros(11, np.float32)
    messages, sent, folder, folded = _round(link, _arrays(grown), [1], tmp_path, "r2t")
    assert keys.ARRAYS in messages[0].content.array_records  # not a delta
    assert folder.valid_count == 1 and sent == [[keys.DELTA]]
    assert _numpy(folded)["head.weight"].shape == (11, 144)


def test_perffedavg_weights_compressed_replies_like_dense_ones(tmp_path) -> None:
    def perf_round(codec: str) -> dict[str, np.ndarray]:
        link = Link(codec, 0.1, "none")
        arrays = _arrays(MODEL)
        messages = link.outgoing(_server_messages([1, 2, 3], arrays), arrays, "r1t")
        folder = ReplyFolder(arrays, perf_alpha=0.5, link=link)
        for m in messages:
            reply = _deliver(m, tmp_path / codec)
            node = reply.metadata.src_node_id
            reply.content[keys.METRICS][keys.LOCAL_ACCURACY] = 1.0 - 0.3 * node
            folder(reply)
        folded, _ = folder.aggregate()
        return _numpy(folded)

    dense, compressed = perf_round("none"), perf_round("int8")
    for k in MODEL:
        np.testing.assert_allclose(compressed[k], dense[k], atol=2e-4)
    assert not np.allclose(dense["head.bias"], _expected([1, 2, 3]))  # not FedAvg


def _evaluate(link: Link, arrays: ArrayRecord, nodes: list[int], cache: Path) -> None:
    set_task_identity()
    plain = _server_messages(nodes, arrays)
    messages = [
        Message(
            content=m.content,
            dst_node_id=m.metadata.dst_node_id,
            message_type=MessageType.EVALUATE,
        )
        for m in plain
    ]
    for m in link.outgoing(messages, arrays, "e"):
        reply = _deliver(m, cache)
        link.note(reply)


def test_the_downlink_is_one_chain_whoever_evaluated_or_sat_out(tmp_path) -> None:
    """Nodes that evaluated, or missed a round, stay on the one published chain:
    never more than the deltas they missed, never the whole model again."""
    link = Link("none", 0.1, "int8")
    arrays = _arrays(MODEL)
    nodes = [1, 2, 3, 4]
    whole = message_bytes(RecordDict({keys.ARRAYS: arrays}))
    sizes: dict[int, list[int]] = {n: [] for n in nodes}
    for r in range(1, 6):
        sampled = nodes if r != 3 else [1, 2]  # 3 and 4 sit round 3 out
        messages = link.outgoing(_server_messages(sampled, arrays), arrays, f"r{r}t")
        for m in messages:
            sizes[m.metadata.dst_node_id].append(message_bytes(m.content))
        folder = ReplyFolder(arrays, link=link)
        for m in messages:
            folder(_deliver(m, tmp_path))
        arrays, _ = folder.aggregate()
        _evaluate(link, arrays, [1 + r % 4], tmp_path)  # one node evaluates
        assert len(set(link.held.values())) <= 2  # never more than two steps apart
    for node in nodes:
        first, *later = sizes[node]
        assert first > whole  # round 1: the whole model
        # later: a delta or two (3 and 4 missed one), never the whole model
        assert all(whole / s > 1.7 for s in later), (node, sizes[node])
    one_delta = min(s for node in nodes for s in sizes[node][1:])
    assert whole / one_delta > 3.5


def test_a_node_past_the_chain_gets_the_whole_model(tmp_path) -> None:
    link = Link("none", 0.1, "int8")
    arrays = _arrays(MODEL)
    messages, _, _, arrays = _round(link, arrays, [1, 2], tmp_path, "r1t")
    for r in range(2, 7):  # node 2 sits out rounds 2-6: more than MAX_DELTAS
        messages, _, _, arrays = _round(link, arrays, [1], tmp_path, f"r{r}t")
    messages = link.outgoing(_server_messages([1, 2], arrays), arrays, "r7t")
    kinds = {m.metadata.dst_node_id: list(m.content.array_records) for m in messages}
    assert kinds == {1: [keys.DOWNLINK], 2: [keys.ARRAYS]}
