"""Replies folded as they arrive: same result as Flower's aggregation, PerfFedAvg's
weights streamed exactly, bad replies rejected, a slow node timed out."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from apps.exchange import (
    ReplyFolder,
    count_of,
    dispatch_plan,
    exchange,
    histogram_problem,
    outcome_of,
    reply_order,
)
from fedobj import keys
from fedobj.aggregation import perf_fedavg_weights
from tests.apps.helpers import error_reply, instruction, reply, set_task_identity

RNG = np.random.default_rng(3)
REF = {
    "conv.weight": RNG.normal(size=(8, 1, 3, 3)).astype(np.float32),
    "head.weight": RNG.normal(size=(10, 128)).astype(np.float32),
    "head.bias": RNG.normal(size=(10,)).astype(np.float32),
}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def train_reply(
    node: int, n: int, acc: float | None = None, shift: float = 0.0
) -> Message:
    arrays = {
        k: v + np.float32(shift) + RNG.normal(size=v.shape).astype(np.float32)
        for k, v in REF.items()
    }
    metrics = {keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0 / n}
    if acc is not None:
        metrics[keys.LOCAL_ACCURACY] = acc
    return reply(
        node,
        RecordDict({keys.ARRAYS: _record(arrays), keys.METRICS: MetricRecord(metrics)}),
    )


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def test_streamed_fedavg_equals_flowers_aggregation() -> None:
    replies = [train_reply(i, n) for i, n in enumerate([50, 300, 7, 1200, 64], 11)]
    folder = ReplyFolder(_record(REF))
    for r in replies:
        folder(r)
    arrays, metrics = folder.aggregate()
    assert arrays is not None and metrics is not None
    flower = aggregate_arrayrecords([r.content for r in replies], keys.NUM_EXAMPLES)
    for k in REF:
        np.testing.assert_allclose(
            arrays[k].numpy(), flower[k].numpy(), rtol=1e-5, atol=1e-6
        )
    total = 50 + 300 + 7 + 1200 + 64
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(5 / total)
    assert folder.valid_count == 5 and not folder.rejected and folder.valid == []


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_streamed_perffedavg_equals_its_weights(alpha: float) -> None:
    spec = [(40, 0.9), (400, 0.5), (80, None), (10, 0.0), (200, None)]
    replies = [train_reply(i, n, acc, shift=i) for i, (n, acc) in enumerate(spec, 11)]
    folder = ReplyFolder(_record(REF), perf_alpha=alpha)
    for r in replies:
        folder(r)
    arrays, _ = folder.aggregate()
    assert arrays is not None
    w = perf_fedavg_weights([n for n, _ in spec], [a for _, a in spec], alpha)
    for k in REF:
        expected = sum(
            wi * r.content.array_records[keys.ARRAYS][k].numpy().astype(np.float64)
            for wi, r in zip(w, replies, strict=True)
        )
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_a_reply_found_non_finite_while_folding_is_taken_out_entirely(
    alpha: float | None,
) -> None:
    """Values are checked as replies are folded: ``finish`` rejects the NaN reply
    and the mean, train metrics and PerfFedAvg weights are the other replies'."""
    spec = [(40, 0.9), (400, 0.5), (80, None), (200, 0.7)]
    replies = [train_reply(i, n, acc, shift=i) for i, (n, acc) in enumerate(spec, 11)]
    nan = train_reply(20, 5000, 0.99)
    nan.content.array_records[keys.ARRAYS]["conv.weight"] = Array(
        np.full((8, 1, 3, 3), np.nan, np.float32)
    )
    with_nan = ReplyFolder(_record(REF), perf_alpha=alpha)
    for r in replies[:2] + [nan] + replies[2:]:
        with_nan(r)
    assert not with_nan.rejected and with_nan.valid_count == 5  # not yet known
    with_nan.finish()
    assert [(o.node_id, o.failure) for o in with_nan.rejected] == [(20, "invalid")]
    assert "conv.weight contains NaN" in str(with_nan.rejected[0].error)
    assert with_nan.valid_count == 4
    without = ReplyFolder(_record(REF), perf_alpha=alpha)
    for r in replies:
        without(r)
    (got, got_m), (want, want_m) = with_nan.aggregate(), without.aggregate()
    assert got is not None and want is not None and got_m is not None
    for k in REF:
        np.testing.assert_allclose(
            got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-5
        )
    assert dict(got_m) == pytest.approx(dict(want_m))


def _nan_reply(node: int, n: int, acc: float | None) -> Message:
    bad = train_reply(node, n, acc)
    bad.content.array_records[keys.ARRAYS]["head.bias"] = Array(
        np.full(10, np.inf, np.float32)
    )
    return bad


@pytest.mark.parametrize(
    "refused_accs",
    [[None], [0.1, 0.2, 0.3], [None, 0.4]],
    ids=["every-node-without-accuracy", "every-node-with-one", "both-kinds"],
)
def test_perffedavg_after_refusals_is_the_mean_of_the_others(
    refused_accs: list[float | None],
) -> None:
    """Refusing every reply of one PerfFedAvg group (no accuracy, or with one)
    leaves the others' weights: no empty mean is asked for its result."""
    kept = [(40, 0.9), (400, 0.5)] if None in refused_accs else [(40, None)]
    replies = [train_reply(i, n, acc, shift=i) for i, (n, acc) in enumerate(kept, 11)]
    bad = [_nan_reply(30 + i, 100, acc) for i, acc in enumerate(refused_accs)]
    with_bad = ReplyFolder(_record(REF), perf_alpha=0.3)
    for r in bad + replies:
        with_bad(r)
    without = ReplyFolder(_record(REF), perf_alpha=0.3)
    for r in replies:
        without(r)
    (got, _), (want, _) = with_bad.aggregate(), without.aggregate()
    assert len(with_bad.rejected) == len(bad) and with_bad.valid_count == len(kept)
    assert got is not None and want is not None
    for k in REF:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5)


def test_no_valid_reply_aggregates_to_nothing() -> None:
    folder = ReplyFolder(_record(REF))
    folder(_nan_reply(11, 50, None))
    folder(
        reply(
            12,
            RecordDict(
                {
                    keys.ARRAYS: _record({**REF, "head.bias": np.zeros(9, np.float32)}),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
                }
            ),
        )
    )
    assert folder.aggregate() == (None, None)
    assert folder.valid_count == 0 and len(folder.rejected) == 2


def test_aggregate_without_finish_counts_the_refusal_too() -> None:
    folder = ReplyFolder(_record(REF))
    for r in (train_reply(11, 50), _nan_reply(12, 5000, None)):
        folder(r)
    _, metrics = folder.aggregate()
    assert folder.valid_count == 1 and [o.node_id for o in folder.rejected] == [12]
    assert metrics is not None and metrics[keys.TRAIN_LOSS] == pytest.approx(1 / 50)


def test_bad_replies_are_rejected_with_reasons_and_never_folded() -> None:
    good = train_reply(11, 100)
    wrong_shape = reply(
        12,
        RecordDict(
            {
                keys.ARRAYS: _record({**REF, "head.bias": np.zeros(9, np.float32)}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
            }
        ),
    )
    nan = reply(
        13,
        RecordDict(
            {
                keys.ARRAYS: _record(
                    {**REF, "head.bias": np.full(10, np.nan, np.float32)}
                ),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
            }
        ),
    )
    folder = ReplyFolder(_record(REF))
    for r in (good, wrong_shape, nan, error_reply(14, "boom")):
        folder(r)
    folder.finish()  # values are checked as they are folded
    assert folder.valid_count == 1
    reasons = {o.node_id: o.error for o in folder.rejected}
    assert set(reasons) == {12, 13, 14}
    assert "shape" in str(reasons[12]) and "NaN" in str(reasons[13])
    assert "boom" in str(reasons[14])
    arrays, _ = folder.aggregate()
    assert arrays is not None
    # the only valid reply is the mean, up to the float32 rounding of w * x
    np.testing.assert_allclose(
        arrays["head.bias"].numpy(),
        good.content.array_records[keys.ARRAYS]["head.bias"].numpy(),
        rtol=2e-7,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class SlowGrid:
    """Replies become pullable at given (fake) times; one node never answers."""

    def __init__(self, clock: FakeClock, delays: dict[int, float | None]) -> None:
        self.clock = clock
        self.delays = delays
        self.due: list[tuple[float, Message]] = []
        self.pushed: list[tuple[float, int]] = []  # (time, node) per message

    def push_messages(self, messages):  # noqa: ANN001
        ids = []
        for msg in messages:
            i = len(self.pushed)
            self.pushed.append((self.clock.now, msg.metadata.dst_node_id))
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            ids.append(f"m{i}")
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                self.due.append(
                    (self.clock.now + delay, Message(RecordDict(), reply_to=msg))
                )
        return ids

    def pull_messages(self, ids):  # noqa: ANN001
        ready = [
            m
            for t, m in self.due
            if t <= self.clock.now and m.metadata.reply_to_message_id in ids
        ]
        self.due = [(t, m) for t, m in self.due if m not in ready]
        return ready


def test_exchange_hands_replies_over_as_they_arrive_and_times_out() -> None:
    clock = FakeClock()
    grid = SlowGrid(clock, {1: 0.0, 2: 4.1, 3: None})
    seen: list[tuple[str, float]] = []
    got = exchange(
        grid,  # type: ignore[arg-type]
        [instruction(n) for n in (1, 2, 3)],
        timeout=30.0,
        on_reply=lambda m: seen.append((m.metadata.reply_to_message_id, clock.now)),
        clock=clock,
        sleep=clock.sleep,
    )
    assert got == 2 and [s[0] for s in seen] == ["m0", "m1"]
    assert seen[0][1] == 0.0  # handed over at once, not after the slow node
    # picked up within one poll interval of arriving (Flower's loop: at 6 s)
    assert 4.1 <= seen[1][1] <= 4.1 + 0.5
    assert clock.now == pytest.approx(30.0)  # the silent node costs the timeout
    assert max(clock.sleeps) <= 0.5


def test_dispatch_plan_orders_longest_first_and_staggers_only_when_safe() -> None:
    msgs = [instruction(n) for n in (1, 2, 3, 4)]
    last = {1: 2.0, 2: 9.0, 3: 4.5, 4: 1.0}
    ordered, stagger = dispatch_plan(msgs, last, 0.12)
    assert [m.metadata.dst_node_id for m in ordered] == [2, 3, 1, 4]
    assert stagger == 0.12  # 3 x 0.12 s of pushes <= half of 9 s
    # a node without a time (new, or it failed last round) goes first, no stagger
    ordered, stagger = dispatch_plan(msgs, {1: 2.0, 3: 4.5}, 0.12)
    assert [m.metadata.dst_node_id for m in ordered] == [2, 4, 3, 1]
    assert stagger == 0.0
    # pushes that would take longer than half the longest node: all at once
    assert dispatch_plan(msgs, last, 2.0)[1] == 0.0
    assert dispatch_plan(msgs, last, 0.0) == (ordered_by(msgs, [2, 3, 1, 4]), 0.0)
    assert dispatch_plan(msgs[:1], last, 0.12)[1] == 0.0


def ordered_by(msgs: list[Message], nodes: list[int]) -> list[Message]:
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    return [by_node[n] for n in nodes]


def test_staggered_exchange_pushes_one_at_a_time_in_order() -> None:
    clock = FakeClock()
    grid = SlowGrid(clock, {1: 3.0, 2: 1.0, 3: 2.0})
    seen: list[int] = []
    got = exchange(
        grid,  # type: ignore[arg-type]
        [instruction(n) for n in (3, 1, 2)],
        timeout=30.0,
        on_reply=lambda m: seen.append(m.metadata.src_node_id),
        stagger=0.12,
        clock=clock,
        sleep=clock.sleep,
    )
    assert got == 3
    assert [n for _, n in grid.pushed] == [3, 1, 2]
    assert [t for t, _ in grid.pushed] == pytest.approx([0.0, 0.12, 0.24])
    assert clock.now <= 3.12 + 0.5  # the last reply (due at 3.12) within one poll


def test_a_refused_reply_leaves_no_trace_in_the_train_metrics() -> None:
    """A diverged node sends NaN weights and a NaN loss with a huge count: the
    round's metrics are the other replies' alone."""
    good = [train_reply(11, 50), train_reply(12, 150)]
    diverged = _nan_reply(13, 10**15, None)
    diverged.content.metric_records[keys.METRICS][keys.TRAIN_LOSS] = float("nan")
    folder = ReplyFolder(_record(REF))
    for r in good[:1] + [diverged] + good[1:]:
        folder(r)
    _, metrics = folder.aggregate()
    assert metrics is not None
    assert metrics[keys.TRAIN_LOSS] == pytest.approx((50 / 50 + 150 / 150) / 200)


@pytest.mark.parametrize(
    ("n", "acc", "reason"),
    [
        (1e-50, 0.5, "num-examples"),
        (100, float("inf"), "local-accuracy"),
        (100, float("nan"), "local-accuracy"),
        (100, 1.5, "local-accuracy"),
        (100, -0.1, "local-accuracy"),
    ],
)
def test_unusable_weights_are_rejected_not_raised(
    n: float, acc: float, reason: str
) -> None:
    folder = ReplyFolder(_record(REF), perf_alpha=0.5)
    folder(train_reply(11, 80, 0.7))
    bad = train_reply(12, 10, acc)
    bad.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = n
    folder(bad)
    folder.finish()
    assert [o.node_id for o in folder.rejected] == [12]
    assert reason in str(folder.rejected[0].error)
    arrays, _ = folder.aggregate()
    assert arrays is not None


def _with_histogram(msg: Message, histogram: dict[str, object]) -> Message:
    msg.content[keys.LABEL_HISTOGRAM] = ConfigRecord(histogram)
    return msg


def test_counts_beyond_what_float64_and_the_catalog_hold_are_refused() -> None:
    folder = ReplyFolder(_record(REF))
    huge = train_reply(12, 10)
    huge.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = 1.4e19
    folder(huge)
    assert "implausibly large" in str(folder.rejected[0].error)
    msg = _with_histogram(train_reply(11, 40), {"shirt": 2**62, "coat": 40})
    assert outcome_of(msg).labels == {"coat": 40}
    assert [count_of(v) for v in (5, 5.0, float("nan"), 1e19, -1, True, "7")] == [
        5,
        5,
        0,
        0,
        0,
        0,
        0,
    ]


def test_a_histogram_must_add_up_and_name_only_the_class_maps_slugs() -> None:
    assert histogram_problem({"a": 3, "b": 4}, 7.0) is None
    assert histogram_problem({"a": 3, "b": 4}, 7.0, ["a", "b", "c"]) is None
    assert histogram_problem({}, 0.0) is None
    assert "counts 7 images" in str(histogram_problem({"a": 3, "b": 4}, 8.0))
    assert "['b']" in str(histogram_problem({"a": 3, "b": 4}, 7.0, ["a"]))


def test_a_histogram_count_that_is_not_a_count_is_dropped() -> None:
    """Negative, boolean or non-integer counts say nothing about the node's
    images (a negative one made the catalog refuse the whole histogram)."""
    msg = _with_histogram(
        train_reply(11, 40), {"shirt": 10, "coat": -5, "bag": True, "hat": 2.5}
    )
    assert outcome_of(msg).labels == {"shirt": 10}


def test_kept_replies_come_out_in_one_order_whatever_order_they_arrived_in() -> None:
    """FedAdam and the DP wrappers sum the kept replies: the order must not be
    the arrival race's. Equal example counts: the arrays decide."""
    replies = [train_reply(i, n) for i, n in enumerate([64, 64, 64, 7, 300], 11)]
    orders = []
    for arrival in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 1, 4, 0, 2]):
        folder = ReplyFolder(_record(REF), stream=False)
        for i in arrival:
            folder(replies[i])
        folder.finish()
        orders.append([m.metadata.src_node_id for m in folder.valid])
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == [11, 12, 13, 14, 15]


def test_reply_order_reads_the_content_never_the_node_id() -> None:
    a, b = train_reply(3, 50), train_reply(4, 50)
    same_as_a = reply(99, a.content)  # another node, the same content
    assert reply_order(same_as_a) == reply_order(a) != reply_order(b)
    failed = error_reply(1, "boom")
    assert sorted([failed, a, b], key=reply_order)[-1] is failed  # errors last
