"""CatalogStrategy's round loop with a scripted Grid and a real SQLite catalog.

The Grid hands back replies built by hand (as a ClientApp would send them), so the
contracts are checked exactly: growth between rounds keeps old rows, bad replies
never reach aggregation, every round leaves a version, a rollback is honoured.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg

from apps.records import get_model_context
from apps.strategy import CatalogStrategy, NoActiveCategoryError
from fedobj import keys
from fedobj.calibration import CalibrationSettings
from fedobj.catalog import SyncCatalog
from fedobj.data.categories import FASHION_MNIST_NAMES
from fedobj.model import ModelArgs, build_model
from fedobj.registry import ArtifactStore
from tests.apps.helpers import error_reply, set_task_identity

Behaviour = Callable[[int, int, Message], Message]
HEAD_W, HEAD_B = "classifier.weight", "classifier.bias"


class ScriptedGrid:
    """Nodes 11, 12, 13; ``train`` builds each node's reply; hooks run per round."""

    def __init__(self, train: Behaviour, evaluate: Behaviour | None = None) -> None:
        self.node_ids = [11, 12, 13]
        self.train = train
        self.evaluate = evaluate
        self.sent: dict[int, list[Message]] = {}
        self.after_round: dict[int, Callable[[], None]] = {}
        self.outbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001
        messages = list(messages)
        out = []
        for msg in messages:
            config = msg.content.config_records[keys.CONFIG]
            rnd = int(config[keys.SERVER_ROUND])
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.TRAIN:
                self.sent.setdefault(rnd, []).append(msg)
                out.append(self.train(rnd, node, msg))
            elif self.evaluate is not None:
                self.sent.setdefault(-rnd, []).append(msg)
                out.append(self.evaluate(rnd, node, msg))
            else:
                out.append(_evaluated(msg))
                if (
                    rnd in self.after_round
                    and node == messages[-1].metadata.dst_node_id
                ):
                    self.after_round.pop(rnd)()
        return out

    # the strategy pushes and pulls itself (apps/exchange.py)
    def push_messages(self, messages):  # noqa: ANN001
        messages = list(messages)
        for msg in messages:  # as Flower's grids do when they push
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        replies = list(self.send_and_receive(messages))
        for msg, reply in zip(messages, replies, strict=True):
            # a scripted reply may be built for another instruction (error_reply)
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
        self.outbox = self.outbox + replies  # pushes may come one message at a time
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):  # noqa: ANN001
        ids = set(message_ids)
        out = [m for m in self.outbox if m.metadata.reply_to_message_id in ids]
        self.outbox = [m for m in self.outbox if m not in out]
        return out


def _evaluated(msg: Message) -> Message:
    metrics = MetricRecord(
        {keys.NUM_EXAMPLES: 5, keys.EVAL_LOSS: 1.0, keys.EVAL_ACCURACY: 0.5}
    )
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def plus(delta: float, n: int = 10) -> Behaviour:
    """Every node returns the broadcast arrays + ``delta`` with ``n`` examples."""

    def reply(rnd: int, node: int, msg: Message) -> Message:
        arrays = msg.content.array_records[keys.ARRAYS]
        new = {
            k: v.numpy() + np.asarray(delta, v.numpy().dtype) for k, v in arrays.items()
        }
        content = RecordDict(
            {
                keys.ARRAYS: _rec(new),
                keys.LABEL_HISTOGRAM: ConfigRecord({"t-shirt-top": n}),
                keys.METRICS: MetricRecord(
                    {
                        keys.NUM_EXAMPLES: n,
                        keys.TRAIN_LOSS: 1.0,
                        keys.TRAIN_ACCURACY: 0.5,
                    }
                ),
            }
        )
        return Message(content, reply_to=msg)

    return reply


def _rec(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


@pytest.fixture
def setup(tmp_path: Path):
    set_task_identity()
    catalog = SyncCatalog(tmp_path / "catalog.db")
    catalog.migrate()
    catalog.seed_categories(FASHION_MNIST_NAMES[:6])
    store = ArtifactStore(tmp_path / "registry")
    args = ModelArgs("cnn", 6)
    initial = ArrayRecord(build_model(args).state_dict())
    return catalog, store, args, initial


def make(inner, catalog, store, args, **kw) -> CatalogStrategy:  # noqa: ANN001
    return CatalogStrategy(
        inner,
        catalog=catalog,
        store=store,
        model_args=args,
        run_id="run-1",
        lr_fn=lambda r: 0.1,
        **kw,
    )


def make_fedavg(catalog, store, args, **kw) -> CatalogStrategy:  # noqa: ANN001
    """The strategy most tests drive: FedAvg over the 3 scripted nodes."""
    return make(
        FedAvg(min_available_nodes=3, min_train_nodes=3), catalog, store, args, **kw
    )


def test_every_round_leaves_a_version_and_a_round_row(setup) -> None:
    catalog, store, args, initial = setup
    strategy = make_fedavg(
        catalog,
        store,
        args,
        evaluate_fn=lambda r, a, cm: {"accuracy": 0.1 * r},
    )
    grid = ScriptedGrid(plus(1.0))
    result = strategy.start(grid, initial, num_rounds=2)
    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    assert [v.round for v in versions] == [1, 2]
    assert versions[1].parent_id == versions[0].id and versions[1].is_current
    assert versions[1].metrics["accuracy"] == pytest.approx(0.2)
    ck = store.load_checkpoint(
        versions[1].checkpoint_uri, versions[1].checkpoint_sha256
    )
    assert ck.class_map.num_classes == 6 and ck.round == 2
    w0 = initial[HEAD_W].numpy()
    np.testing.assert_allclose(ck.state_dict[HEAD_W].numpy(), w0 + 2.0, rtol=1e-6)
    rounds = catalog.rounds("run-1")
    assert [(r.round, r.status, r.nodes_replied) for r in rounds] == [
        (1, "completed", 3),
        (2, "completed", 3),
    ]
    assert result.arrays is not None
    # each node's label histogram counts once per run, not once per round
    assert catalog.get_category("t-shirt-top").sample_count == 30
    nodes = catalog.list_nodes()
    assert sorted(n.node_id for n in nodes) == ["11", "12", "13"]
    assert all(n.label_names == ["t-shirt-top"] and n.samples == 10 for n in nodes)
    config = grid.sent[1][0].content.config_records[keys.CONFIG]
    margs, cmap = get_model_context(config)
    assert margs.num_classes == 6 and cmap.num_classes == 6 and config[keys.LR] == 0.1


def test_growth_between_rounds_keeps_old_rows_and_rejects_stale_replies(setup) -> None:
    catalog, store, args, initial = setup

    def behaviour(rnd: int, node: int, msg: Message) -> Message:
        reply = plus(1.0)(rnd, node, msg)
        if rnd == 2 and node == 13:  # a node still sending the pre-growth head
            stale = {
                k: v.numpy()
                for k, v in reply.content.array_records[keys.ARRAYS].items()
            }
            stale[HEAD_W], stale[HEAD_B] = stale[HEAD_W][:6], stale[HEAD_B][:6]
            reply.content.array_records[keys.ARRAYS] = _rec(stale)
        return reply

    grid = ScriptedGrid(behaviour)
    grid.after_round[1] = lambda: [
        catalog.add_category(n) for n in FASHION_MNIST_NAMES[6:]
    ]
    strategy = make_fedavg(catalog, store, args)
    strategy.start(grid, initial, num_rounds=2)

    v1 = [v for v in catalog.list_versions() if v.round == 1][0]
    after_r1 = store.load_checkpoint(v1.checkpoint_uri, v1.checkpoint_sha256)
    sent_r2 = grid.sent[2][0].content.array_records[keys.ARRAYS][HEAD_W].numpy()
    assert sent_r2.shape[0] == 10
    # old rows are bit-identical to the round-1 model (contract 4)
    np.testing.assert_array_equal(sent_r2[:6], after_r1.state_dict[HEAD_W].numpy())
    margs, cmap = get_model_context(grid.sent[2][0].content.config_records[keys.CONFIG])
    assert margs.num_classes == 10 and cmap.num_classes == 10
    report = strategy.reports[2]
    assert report.grew_from == 6
    assert [b.node_id for b in report.rejected] == [13]
    assert "classifier.weight has shape (6, 128)" in report.rejected[0].error
    rnd2 = [r for r in catalog.rounds("run-1") if r.round == 2][0]
    assert rnd2.nodes_replied == 2 and rnd2.nodes_rejected == 1
    final = catalog.current_version()
    assert final is not None and final.class_map.num_classes == 10
    ck = store.load_checkpoint(final.checkpoint_uri, final.checkpoint_sha256)
    assert ck.state_dict[HEAD_W].shape[0] == 10 and ck.model_args.num_classes == 10


@pytest.mark.parametrize("bad", ["nan", "zero-examples", "error"])
def test_invalid_replies_are_dropped_before_aggregation(setup, bad: str) -> None:
    catalog, store, args, initial = setup

    def behaviour(rnd: int, node: int, msg: Message) -> Message:
        if node != 12:
            return plus(1.0)(rnd, node, msg)
        if bad == "error":
            return error_reply(12, "ClientApp crashed")
        if bad == "zero-examples":
            return plus(100.0, n=0)(rnd, node, msg)
        return plus(float("nan"))(rnd, node, msg)

    strategy = make_fedavg(catalog, store, args)
    result = strategy.start(ScriptedGrid(behaviour), initial, num_rounds=1)
    assert result.arrays is not None
    np.testing.assert_allclose(
        result.arrays[HEAD_W].numpy(), initial[HEAD_W].numpy() + 1.0, rtol=1e-6
    )
    assert [b.node_id for b in strategy.reports[1].rejected] == [12]


def test_rollback_during_a_run_is_honoured_next_round(setup) -> None:
    catalog, store, args, initial = setup
    grid = ScriptedGrid(plus(1.0))

    strategy = make_fedavg(catalog, store, args)
    strategy.start(grid, initial, num_rounds=2)  # rounds 1, 2
    v1 = [v for v in catalog.list_versions() if v.round == 1][0]
    catalog.set_current(v1.id)
    strategy.start(
        grid,
        ArrayRecord(build_model(args).state_dict()),
        num_rounds=1,
        first_round=3,
        parent_version=[v for v in catalog.list_versions() if v.round == 2][0].id,
    )
    sent_r3 = grid.sent[3][0].content.array_records[keys.ARRAYS][HEAD_W].numpy()
    np.testing.assert_allclose(sent_r3, initial[HEAD_W].numpy() + 1.0, rtol=1e-6)
    v3 = [v for v in catalog.list_versions() if v.round == 3][0]
    assert v3.parent_id == v1.id and v3.is_current
    assert strategy.reports[3].rolled_back_to == v1.name


def test_fedadam_moments_grow_with_the_head(setup) -> None:
    catalog, store, args, initial = setup
    inner = FedAdam(min_available_nodes=3, min_train_nodes=3, eta=0.01)
    grid = ScriptedGrid(plus(1.0))
    grid.after_round[1] = lambda: catalog.add_category("Sneaker")
    strategy = make(inner, catalog, store, args)
    strategy.start(grid, initial, num_rounds=1)
    m_before = inner.m_t[HEAD_W].copy()
    strategy.start(
        grid,
        strategy_arrays(catalog, store),
        num_rounds=1,
        first_round=2,
        class_map=strategy.class_map.__class__(
            tuple(e for e in catalog.snapshot().entries if e.index < 6)
        ),
        parent_version=catalog.current_version().id,
    )
    assert inner.m_t[HEAD_W].shape[0] == 7
    assert inner.v_t[HEAD_W].shape[0] == 7
    # the old rows' moments carried on (they were updated once more in round 2)
    assert not np.array_equal(inner.m_t[HEAD_W][:6], m_before)
    v2 = catalog.current_version()
    assert v2.server_state_uri is not None


def strategy_arrays(catalog: SyncCatalog, store: ArtifactStore) -> ArrayRecord:
    v = catalog.current_version()
    ck = store.load_checkpoint(v.checkpoint_uri, v.checkpoint_sha256)
    return ArrayRecord(ck.state_dict)


def test_no_active_category_refuses_to_start(setup) -> None:
    catalog, store, args, initial = setup
    for c in catalog.list_categories():
        catalog.deactivate_category(c.id)
    strategy = make(FedAvg(), catalog, store, args)
    with pytest.raises(NoActiveCategoryError, match="no active category"):
        strategy.start(ScriptedGrid(plus(1.0)), initial, num_rounds=1)


def wait_for_version(catalog: SyncCatalog, server_round: int) -> None:
    """What an admin does before rolling back from version N: see it exist."""
    deadline = time.monotonic() + 30
    while not any(v.round == server_round for v in catalog.list_versions()):
        assert time.monotonic() < deadline, f"no version for round {server_round}"
        time.sleep(0.01)


def test_rollback_during_a_round_wins_over_that_rounds_version(setup) -> None:  # noqa: ANN001
    """The admin rolls back to v1 while round 3 runs (v2 current): round 3's version
    is kept but not made current, and round 4 continues from v1."""
    catalog, store, args, initial = setup
    grid = ScriptedGrid(plus(1.0))

    def roll_back() -> None:
        wait_for_version(catalog, 2)
        catalog.set_current(next(v for v in catalog.list_versions() if v.round == 1).id)

    grid.after_round[3] = roll_back
    strategy = make_fedavg(catalog, store, args)
    strategy.start(grid, initial, num_rounds=4)
    v = {x.round: x for x in catalog.list_versions()}
    assert not v[3].is_current and v[3].parent_id == v[2].id
    assert v[4].parent_id == v[1].id and v[4].is_current
    assert strategy.reports[4].rolled_back_to == v[1].name
    ck1 = store.load_checkpoint(v[1].checkpoint_uri, v[1].checkpoint_sha256)
    sent_r4 = grid.sent[4][0].content.array_records[keys.ARRAYS][HEAD_W].numpy()
    np.testing.assert_array_equal(sent_r4, ck1.state_dict[HEAD_W].numpy())


def test_a_fresh_run_makes_its_versions_current_over_an_older_run(setup) -> None:
    catalog, store, args, initial = setup
    grid = ScriptedGrid(plus(1.0))
    make_fedavg(catalog, store, args).start(grid, initial, num_rounds=1)
    second = CatalogStrategy(
        FedAvg(min_available_nodes=3, min_train_nodes=3),
        catalog=catalog,
        store=store,
        model_args=args,
        run_id="run-2",
        lr_fn=lambda r: 0.1,
    )
    second.start(ScriptedGrid(plus(1.0)), initial, num_rounds=1)
    current = catalog.current_version()
    assert current is not None and current.run_id == "run-2"


def test_lr_schedule_runs_through_a_growth_and_restarts_on_resume(setup) -> None:
    catalog, store, args, initial = setup
    grid = ScriptedGrid(plus(1.0))
    grid.after_round[1] = lambda: catalog.add_category("Sneaker")
    strategy = CatalogStrategy(
        FedAvg(min_available_nodes=3, min_train_nodes=3),
        catalog=catalog,
        store=store,
        model_args=args,
        run_id="run-1",
        lr_fn=lambda r: 1.0 / r,
    )
    strategy.start(grid, initial, num_rounds=3)

    def lr(rnd: int) -> float:
        return float(grid.sent[rnd][0].content.config_records[keys.CONFIG][keys.LR])

    assert [lr(1), lr(2), lr(3)] == [1.0, 0.5, 1 / 3]  # grew at round 2
    v3 = catalog.current_version()
    strategy.start(
        grid,
        strategy_arrays(catalog, store),
        num_rounds=1,
        first_round=4,
        class_map=v3.class_map,
        parent_version=v3.id,
    )
    assert lr(4) == 1.0  # a resumed run's schedule starts at its first round


def test_a_failing_round_never_loses_the_previous_rounds_version(setup) -> None:  # noqa: ANN001
    catalog, store, args, initial = setup
    send = plus(1.0)

    def train(rnd: int, node: int, msg: Message) -> Message:
        if rnd == 2:
            raise ConnectionError("SuperLink gone")
        return send(rnd, node, msg)

    strategy = make_fedavg(catalog, store, args)
    with pytest.raises(ConnectionError, match="SuperLink gone"):
        strategy.start(ScriptedGrid(train), initial, num_rounds=3)
    versions = catalog.list_versions()
    assert [v.round for v in versions] == [1] and versions[0].is_current
    assert catalog.rounds("run-1")[0].status == "completed"


@pytest.mark.parametrize("inner", ["fedavg", "fedadam"])  # streamed, then held
def test_the_head_is_calibrated_on_the_nodes_feature_statistics(
    setup, inner: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Node 11 holds classes 0-2 only, node 12 classes 3-5 only; node 13's
    statistics are malformed (left out, its evaluation kept). The statistics
    come with the evaluate replies (features of the round's aggregate); the
    calibrated head separates all six classes, which no node holds together."""
    catalog, store, args, initial = setup
    rng = np.random.default_rng(0)
    means = rng.normal(scale=0.5, size=(6, 128))
    held = {11: [0, 1, 2], 12: [3, 4, 5]}
    samples = {c: means[c] + 0.2 * rng.normal(size=(200, 128)) for c in range(6)}

    def evaluate(rnd: int, node: int, msg: Message) -> Message:
        out = _evaluated(msg)
        count, total, outer = np.zeros(6), np.zeros((6, 128)), np.zeros((6, 128, 128))
        for c in held.get(node, []):
            f = samples[c]
            count[c], total[c], outer[c] = len(f), f.sum(0), f.T @ f
        if node == 13:
            count = np.zeros(5)  # wrong shape
        out.content[keys.FEATURE_STATS_ARRAYS] = _rec(
            {"count": count, "sum": total, "outer": outer}
        )
        return out

    strategy = make(
        FedAvg(min_available_nodes=3, min_train_nodes=3)
        if inner == "fedavg"
        else FedAdam(min_available_nodes=3, min_train_nodes=3, eta=1e-9),
        catalog,
        store,
        args,
        calibration=CalibrationSettings(samples=100, steps=100, lr=0.5),
    )
    grid = ScriptedGrid(plus(0.0), evaluate)
    with caplog.at_level("INFO", logger="fedobj"):
        result = strategy.start(grid, initial, num_rounds=1)

    train_config = grid.sent[1][0].content.config_records[keys.CONFIG]
    assert keys.FEATURE_STATS not in train_config
    eval_config = grid.sent[-1][0].content.config_records[keys.CONFIG]
    assert eval_config[keys.FEATURE_STATS] is True
    w, b = result.arrays[HEAD_W].numpy(), result.arrays[HEAD_B].numpy()
    before = initial[HEAD_W].numpy(), initial[HEAD_B].numpy()
    feats = np.concatenate([samples[c] for c in range(6)])
    labels = np.repeat(np.arange(6), 200)
    assert ((feats @ before[0].T + before[1]).argmax(1) == labels).mean() < 0.5
    assert ((feats @ w.T + b).argmax(1) == labels).mean() > 0.95
    # the version registered is the calibrated model
    (version,) = catalog.list_versions()
    ck = store.load_checkpoint(version.checkpoint_uri, version.checkpoint_sha256)
    np.testing.assert_array_equal(ck.state_dict[HEAD_W].numpy(), w)
    text = caplog.text
    assert "feature statistics of node 13 left out: feature stats 'count'" in text
    assert "head calibrated on 600 virtual features of 6 classes" in text
    assert "(statistics from 2 nodes)" in text


def test_train_messages_go_out_longest_node_first_from_round_two(setup) -> None:  # noqa: ANN001
    """With ``dispatch-stagger``, round 2's pushes follow round 1's training times
    (longest first), one message per push; without it, one push for the round."""
    catalog, store, args, initial = setup
    seconds = {11: 1.0, 12: 5.0, 13: 3.0}
    base = plus(1.0)

    def timed(rnd: int, node: int, msg: Message) -> Message:
        out = base(rnd, node, msg)
        out.content.metric_records[keys.METRICS][keys.TRAIN_SECONDS] = seconds[node]
        return out

    for stagger, round_two in ((0.12, [1, 1, 1]), (0.0, [3])):
        grid = ScriptedGrid(timed)
        calls: list[int] = []
        push = grid.push_messages

        def counting_push(messages, push=push, calls=calls):  # noqa: ANN001
            messages = list(messages)
            if messages[0].metadata.message_type == MessageType.TRAIN:
                calls.append(len(messages))
            return push(messages)

        grid.push_messages = counting_push  # type: ignore[method-assign]
        strategy = make_fedavg(
            catalog,
            store,
            args,
            dispatch_stagger=stagger,
            evaluate_fn=lambda r, a, cm: {"accuracy": 0.5},
        )
        strategy.start(grid, initial, num_rounds=2)
        assert [m.metadata.dst_node_id for m in grid.sent[2]] == [12, 13, 11]
        assert strategy.last_train_seconds == seconds
        # round 1 knows no times: one push; round 2: one push per message if staggered
        assert calls == [3, *round_two]


def test_last_train_seconds_counts_empty_nodes_and_drops_bad_times() -> None:
    from apps.strategy import NodeResult, last_train_seconds

    outcomes = [
        NodeResult(1, metrics={keys.TRAIN_SECONDS: 4.0, keys.NUM_EXAMPLES: 9}),
        NodeResult(2, metrics={keys.NUM_EXAMPLES: 0}),  # nothing to train: 0 s
        NodeResult(3, metrics={keys.TRAIN_SECONDS: float("nan")}),
        NodeResult(4, metrics={keys.TRAIN_SECONDS: -1.0}),
        NodeResult(5, metrics={keys.TRAIN_SECONDS: 2.0}, failure="error"),
    ]
    assert last_train_seconds(outcomes) == {1: 4.0, 2: 0.0}


def _histogram_reply(
    delta: float, histogram: dict[str, int]
) -> Callable[[Message], Message]:
    def build(msg: Message) -> Message:
        reply = plus(delta, n=sum(histogram.values()))(0, 0, msg)
        reply.content[keys.LABEL_HISTOGRAM] = ConfigRecord(dict(histogram))
        return reply

    return build


def test_a_histogram_that_does_not_add_up_is_not_counted(setup) -> None:
    """A node claiming 10**15 trousers (its example count says 10), and an
    evaluate reply whose example count is NaN or beyond SQLite's INTEGER, leave
    the counts and the run alone (they made the round's bookkeeping raise)."""
    catalog, store, args, initial = setup

    def train_reply(rnd: int, node: int, msg: Message) -> Message:
        histogram = {"t-shirt-top": 10}
        if node == 13:
            histogram = {"t-shirt-top": 10, "trouser": 10**15}
        reply = _histogram_reply(1.0, {"t-shirt-top": 10})(msg)
        reply.content[keys.LABEL_HISTOGRAM] = ConfigRecord(histogram)
        return reply

    def evaluate_reply(rnd: int, node: int, msg: Message) -> Message:
        reply = _evaluated(msg)
        bad = {11: float("nan"), 12: 1.4e19}.get(node)
        if bad is not None:
            reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = bad
        return reply

    grid = ScriptedGrid(train_reply, evaluate_reply)
    strategy = make_fedavg(catalog, store, args)
    strategy.start(grid, initial, num_rounds=2)
    counts = {c.slug: c.sample_count for c in catalog.list_categories()}
    assert counts["t-shirt-top"] == 20 and counts["trouser"] == 0
    assert [r.status for r in catalog.rounds("run-1")] == ["completed", "completed"]


def test_a_category_added_mid_run_is_counted_on_nodes_counted_before(setup) -> None:
    """Each node's images of a category count once per run, also when the
    category appears after the node was first counted (its images of it were
    ignored until then)."""
    catalog, store, args, initial = setup

    def behaviour(rnd: int, node: int, msg: Message) -> Message:
        histogram = {"t-shirt-top": 10} | ({"shirt": 4} if rnd >= 2 else {})
        return _histogram_reply(1.0, histogram)(msg)

    grid = ScriptedGrid(behaviour)
    grid.after_round[1] = lambda: catalog.add_category("Shirt")
    strategy = make_fedavg(catalog, store, args)
    strategy.start(grid, initial, num_rounds=3)
    counts = {c.slug: c.sample_count for c in catalog.list_categories()}
    assert counts["t-shirt-top"] == 30 and counts["shirt"] == 12


def test_distillation_rounds_after_a_growth_name_the_old_classes(setup) -> None:
    """``distill-rounds=2``: the 2 rounds from the growth (6 -> 7 classes at
    round 2) ask nodes to distil the 6 old classes; the others ask for none."""
    catalog, store, args, initial = setup
    grid = ScriptedGrid(plus(1.0))
    grid.after_round[1] = lambda: catalog.add_category("Sneaker")
    strategy = make_fedavg(catalog, store, args, distill_rounds=2)
    strategy.start(grid, initial, num_rounds=4)
    asked = [
        grid.sent[r][0].content.config_records[keys.CONFIG][keys.DISTILL_CLASSES]
        for r in (1, 2, 3, 4)
    ]
    assert asked == [0, 6, 6, 0]
