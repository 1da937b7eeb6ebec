"""Sending a round's messages and folding replies in as they arrive.

Flower's ``Grid.send_and_receive`` returns every reply at once, and polls the
SuperLink with a fixed ``time.sleep(3)`` between pulls: a round whose replies are
all in after 4.1 s is seen after 6 s, twice per round (train, then evaluate), and
every update is held until the last one arrives. :func:`exchange` pushes the
messages itself and pulls with a short, backing-off interval, handing each reply
to a callback the moment it is pulled. :class:`ReplyFolder` is that callback for
training: it validates a reply against the broadcast model (contract 5), folds it
into a streaming weighted mean and lets it go, so the server holds a few updates
at a time, not one per node (DESIGN.md, "The round").

The streaming mean covers FedAvg and FedProx (weights n_k) and PerfFedAvg, whose
weights eta_k = alpha n_k / N + (1 - alpha) acc_k / A are linear in each reply:
it keeps one sum weighted by n, one weighted by the reported accuracies, and one
of the replies that reported none (they count with the mean accuracy, exactly as
:func:`fedobj.aggregation.perf_fedavg_weights` does). Strategies whose
aggregation needs every reply together (FedAdam, a DP wrapper) get the validated
messages instead (``stream=False``).

A node that dies mid-round does not hold the round until ``round-timeout``: once it
misses its heartbeats (Flower 1.41: sent every ~20 s, offline after 2 x 30 s) the
SuperLink answers its message with a ``NODE_UNAVAILABLE`` error reply *from the
SuperLink*, which :func:`exchange` attributes to the node it was sent to; a node
that stays silent until the deadline is reported through ``on_missing``. Either way
the node is counted as failed, with its id and why (:class:`NodeOutcome`; what a
reply says is read in :mod:`apps.replies`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from apps.link import Link
from apps.link_records import message_bytes
from apps.replies import (
    MAX_COUNT,
    ORDER_TAIL_BYTES,
    UNAVAILABLE_CODES,
    NodeOutcome,
    count_of,
    failure_of,
    histogram_problem,
    missing,
    outcome_of,
    reply_order,
    reply_weight,
)
from fedobj import keys
from fedobj.aggregation import StreamingMean, array_view, validate_update
from fedobj.compression import CompressedMean, Layout, Update

__all__ = [  # what a reply says lives in apps/replies.py; importable here too
    "ACC_FLOOR",
    "Aggregate",
    "MAX_COUNT",
    "ORDER_TAIL_BYTES",
    "POLL_FIRST_S",
    "POLL_MAX_S",
    "UNAVAILABLE_CODES",
    "NodeOutcome",
    "ReplyFolder",
    "collect_replies",
    "count_of",
    "dispatch_plan",
    "exchange",
    "failure_of",
    "fold_replies",
    "histogram_problem",
    "missing",
    "outcome_of",
    "reply_order",
    "reply_weight",
]

UPLINK_BYTES = "uplink-bytes"
"""A train outcome's metric: its reply's size as Flower counts it (the bytes
of its arrays and records: ``message_size_mod``)."""
DOWNLINK_BYTES = "downlink-bytes"
"""A train outcome's metric: the size of the message that node was sent."""

POLL_FIRST_S = 0.02
"""First wait between pulls; grows 1.5x per empty pull, reset by each reply."""
POLL_MAX_S = 0.5
"""Longest wait between pulls (Flower's own loop always waits 3 s)."""


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[Message], None],
    *,
    on_missing: Callable[[int], None] | None = None,
    stagger: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Push ``messages``; call ``on_reply`` on each reply as soon as it is pulled.

    Every reply names the node the message went to, including the error replies
    the SuperLink writes for a node that went offline (their sender is the
    SuperLink). Returns how many replies arrived before ``timeout`` seconds; for
    each message still unanswered then, ``on_missing`` gets its node id (the round
    goes on without it). With ``stagger`` > 0 the messages are pushed one at a
    time, in the order given, ``stagger`` seconds apart (see
    :func:`dispatch_plan`). ``clock`` and ``sleep`` are replaceable so the
    schedule can be tested.
    """
    messages = list(messages)
    # the Grid writes each message's id into it as it pushes; a message it could
    # not push gets no id back ("" or None), and no reply will come for it
    if stagger > 0 and len(messages) > 1:
        pending: set[str] = set()
        for i, message in enumerate(messages):
            if i:
                sleep(stagger)
            pending.update(mid for mid in grid.push_messages([message]) if mid)
    else:
        pending = {mid for mid in grid.push_messages(messages) if mid}
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    del messages
    deadline = clock() + timeout  # from the last push: staggering costs no node time
    wait = POLL_FIRST_S
    received = 0
    while pending:
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            if mid in node_of:
                _attribute(reply, node_of[mid])
            received += 1
            on_reply(reply)
        remaining = deadline - clock()
        if not pending or remaining <= 0:
            break
        wait = POLL_FIRST_S if replies else min(POLL_MAX_S, wait * 1.5)
        del replies
        sleep(min(wait, remaining))
    if on_missing is not None:
        for mid in sorted(pending):
            if mid in node_of:
                on_missing(node_of[mid])
    return received


def _attribute(reply: Message, node_id: int) -> None:
    """Name ``node_id`` as the sender of a reply the SuperLink wrote on its behalf.

    Flower's unavailability replies come from ``SUPERLINK_NODE_ID``; counted as
    is, every dead node would look like one node 1. ``Metadata`` has no setter
    for the sender, so this writes the field the way Flower's own link state
    writes a message id (``metadata.__dict__``).
    """
    if reply.metadata.src_node_id != node_id:
        reply.metadata.__dict__["_src_node_id"] = node_id


def dispatch_plan(
    messages: Iterable[Message],
    last_seconds: Mapping[int, float],
    stagger: float,
) -> tuple[list[Message], float]:
    """Train messages longest-first, and the push interval to use (0: all at once).

    Why: in a Ray simulation Flower 1.41 queues the messages it finds for the
    workers in node order, one pass over the nodes and then a 0.1 s wait
    (``vce_api.add_messages_to_queue``), so with unequal partitions a long node
    often starts last and one worker trains it while the other idles. Pushed
    longest-first and ``stagger`` apart (more than a pass and its wait: 0.12 s for
    tens of nodes), they are queued in that order: longest-processing-time-first,
    within a few percent of a perfect split (10 Dirichlet-0.5 nodes on 2 workers:
    27,234 images on the busier worker against 29,606 in node order, 26,998 ideal).

    The order comes from each node's training time in the last round (nodes
    without one first, as given); with ``stagger`` 0 they are still ordered so,
    and pushed at once. Staggering is used only when every node has
    one and the pushes end within half the longest: so it never delays a round
    much, and in a deployment (where every node pulls its own message) it is
    best left off (``dispatch-stagger=0``, the default).
    """
    messages = list(messages)
    unknown = [m for m in messages if m.metadata.dst_node_id not in last_seconds]
    known = sorted(
        (m for m in messages if m.metadata.dst_node_id in last_seconds),
        key=lambda m: -last_seconds[m.metadata.dst_node_id],
    )
    ordered = unknown + known
    if stagger <= 0 or len(ordered) < 2 or unknown:
        return ordered, 0.0
    longest = last_seconds[known[0].metadata.dst_node_id]
    if (len(ordered) - 1) * stagger > 0.5 * longest:
        return ordered, 0.0
    return ordered, stagger


Aggregate = tuple[ArrayRecord | None, MetricRecord | None]
"""An aggregation's result, as Flower's ``aggregate_train`` returns it."""

ACC_FLOOR = 1e-30
"""Local accuracies below this weigh nothing (float32 would round them to 0)."""


def _accuracy_problem(msg: Message) -> str | None:
    """Why a reply's local accuracy cannot weigh it (PerfFedAvg), if it cannot."""
    metrics = msg.content.metric_records.get(keys.METRICS)
    acc = metrics.get(keys.LOCAL_ACCURACY) if metrics is not None else None
    if acc is None or not isinstance(acc, (int, float)):
        return None
    if not (math.isfinite(acc) and 0.0 <= acc <= 1.0):
        return f"local-accuracy must be a number in [0, 1], got {acc!r}"
    return None


class ReplyFolder:
    """Validates train replies as they arrive and folds the good ones in.

    Parameters
    ----------
    reference
        The arrays broadcast this round (shapes every reply must match).
    stream
        Fold into running sums and drop each reply (FedAvg, FedProx,
        PerfFedAvg); otherwise keep the validated messages for the inner
        strategy's own ``aggregate_train``.
    perf_alpha
        PerfFedAvg's alpha; None for plain example-count weights.
    link
        The run's edge link: with ``update-compression`` on, replies are read
        through it (validated, then folded compressed or made whole).

    Every reply's size as Flower counts it is kept in its outcome's metrics
    (:data:`UPLINK_BYTES`), compressed or not.
    """

    def __init__(
        self,
        reference: ArrayRecord,
        *,
        stream: bool = True,
        perf_alpha: float | None = None,
        link: Link | None = None,
    ) -> None:
        self.shapes = {k: tuple(int(d) for d in v.shape) for k, v in reference.items()}
        self.reference = {k: array_view(v) for k, v in reference.items()}
        self.stream = stream
        self.perf_alpha = perf_alpha
        self.link = link if link is not None and link.active else None
        self.outcomes: list[NodeOutcome] = []
        self.rejected: list[NodeOutcome] = []
        self.valid: list[Message] = []
        self.valid_count = 0
        self._by_n: StreamingMean | CompressedMean | None = None
        self._by_acc: StreamingMean | CompressedMean | None = None
        self._no_acc: StreamingMean | CompressedMean | None = None
        self._compressed: Update | None = None  # the compressed update just read
        self._reported = 0  # replies that reported an accuracy, zeros included
        # per folded reply (tag: its place in outcomes, from 1): n and metrics,
        # to take them back out if its values turn out not to be finite
        self._numbers: dict[int, tuple[float, dict[str, float]]] = {}

    def __call__(self, msg: Message) -> None:
        """Take one reply: record it, reject it with a reason, or fold it in."""
        outcome = outcome_of(msg)
        if not msg.has_error():
            outcome.metrics[UPLINK_BYTES] = float(message_bytes(msg.content))
        self.outcomes.append(outcome)
        if self.link is not None:
            self.link.note(msg)
        n, reason = reply_weight(msg)
        tag = len(self.outcomes)
        if n is not None and self.perf_alpha is not None:
            reason = _accuracy_problem(msg)
            n = None if reason is not None else n
        compressed = self.link is not None and self.link.compresses
        if n is not None and compressed:
            reason = self._read_compressed(msg, n)
            record = msg.content.array_records.get(keys.ARRAYS)
        elif n is not None:
            record = msg.content.array_records[keys.ARRAYS]
            if self.stream:
                # names and shapes checked now, values as they are folded in
                reason = self._mean("_by_n").add_record(record, n, tag)
            else:
                views = {k: array_view(v) for k, v in record.items()}
                reason = validate_update(views, self.shapes, n)
        if n is None or reason is not None:
            failure = outcome.failure or "invalid"
            self.rejected.append(
                NodeOutcome(outcome.node_id, error=reason, failure=failure)
            )
            return
        self.valid_count += 1
        # Flower's strategies take exactly one ArrayRecord per reply: the model's
        for key in [k for k in msg.content.array_records if k != keys.ARRAYS]:
            del msg.content[key]
        if not self.stream:
            self.valid.append(msg)
            return
        metrics = msg.content.metric_records[keys.METRICS]
        numbers = {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and key != keys.NUM_EXAMPLES
        }
        self._numbers[tag] = (n, numbers)
        if self.perf_alpha is not None and self.perf_alpha < 1.0:
            acc = metrics.get(keys.LOCAL_ACCURACY)
            if isinstance(acc, (int, float)):
                self._reported += 1
                if acc >= ACC_FLOOR:  # a zero weight adds nothing to the sum
                    self._add("_by_acc", record, float(acc), tag)
            else:
                self._add("_no_acc", record, 1.0, tag)

    def _read_compressed(self, msg: Message, n: float) -> str | None:
        """Validate a compressed reply: fold it (streaming) or make it whole
        for the inner strategy; why it is refused, if it is."""
        assert self.link is not None
        try:
            update, base = self.link.read(msg)
        except ValueError as exc:
            return f"compressed update refused: {exc}"
        if self.stream:
            self._compressed = update
            self._add("_by_n", None, n, len(self.outcomes))
        else:
            msg.content[keys.ARRAYS] = self.link.dense(update, base)
            del msg.content[keys.DELTA]
        return None

    def _add(
        self, name: str, record: ArrayRecord | None, weight: float, tag: int
    ) -> None:
        """Fold a reply into one of the means: its dense record, or the
        compressed update just read."""
        mean = self._mean(name)
        if isinstance(mean, CompressedMean):
            assert self._compressed is not None
            mean.add(self._compressed, weight)
        else:
            assert record is not None
            mean.add_record(record, weight, tag)

    def finish(self) -> None:
        """Fold what is still pending and take out the replies found then to hold
        NaN or infinite values: rejected, with the reason, like any other.
        Kept replies (``stream=False``) are put in :func:`reply_order`.

        Call it before reading ``rejected`` or ``valid_count``: values are
        checked as they are folded (see ``StreamingMean.add_record``).
        """
        refused: dict[int, str] = {}
        for name in ("_by_n", "_by_acc", "_no_acc"):
            mean: StreamingMean | CompressedMean | None = getattr(self, name)
            if mean is not None:
                refused.update({t: r for t, r in mean.flush() if t not in refused})
        for tag, reason in sorted(refused.items()):
            outcome = self.outcomes[tag - 1]
            self.rejected.append(
                NodeOutcome(outcome.node_id, error=reason, failure="invalid")
            )
            self.valid_count -= 1
            _, numbers = self._numbers.pop(tag)
            # every mean it went into refused it too (the same values)
            acc = numbers.get(keys.LOCAL_ACCURACY)
            perf = self.perf_alpha is not None and self.perf_alpha < 1.0
            if perf and acc is not None:
                self._reported -= 1
        self.valid.sort(key=reply_order)

    def missed(self, node_id: int, timeout: float) -> None:
        """Count a node that did not reply in time (``exchange``'s ``on_missing``)."""
        if self.link is not None:
            self.link.forget(node_id)
        outcome = missing(node_id, timeout)
        self.outcomes.append(outcome)
        self.rejected.append(outcome)

    def _mean(self, name: str) -> StreamingMean | CompressedMean:
        mean: StreamingMean | CompressedMean | None = getattr(self, name)
        if mean is None:
            if self.link is not None and self.link.compresses:
                mean = CompressedMean(Layout.of(self.reference), self.link.base())
            else:
                mean = StreamingMean(self.reference)
            setattr(self, name, mean)
        return mean

    def aggregate(
        self, held: Callable[[list[Message]], Aggregate] | None = None
    ) -> Aggregate:
        """The weighted mean of every folded reply and the weighted train metrics
        (``finish`` first, if it was not called); with ``stream=False``, what
        ``held`` (the inner strategy's own aggregation) makes of the kept replies.
        """
        self.finish()
        if not self.stream and held is not None:
            return held(self.valid)
        if self._by_n is None or self._by_n.count == 0:
            return None, None
        mean = self._by_n.result()
        if self._by_acc is not None and self._by_acc.count > 0:
            alpha = float(self.perf_alpha if self.perf_alpha is not None else 1.0)
            reported = self._reported
            by_acc = self._by_acc.result()
            no_acc = (
                self._no_acc.result()
                if self._no_acc is not None and self._no_acc.count > 0
                else None
            )
            missing = 0
            if no_acc is not None and self._no_acc is not None:
                missing = self._no_acc.count
            for k, v in mean.items():
                acc_part = by_acc[k].astype(np.float64) * reported
                if no_acc is not None:
                    acc_part += no_acc[k].astype(np.float64) * missing
                acc_part /= reported + missing
                mixed = alpha * v.astype(np.float64) + (1.0 - alpha) * acc_part
                mean[k] = mixed.astype(v.dtype)
        # from the replies kept (a refused one's NaN loss cannot be subtracted)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for n, numbers in self._numbers.values():
            for key, value in numbers.items():
                sums[key] = sums.get(key, 0.0) + n * value
                weights[key] = weights.get(key, 0.0) + n
        metrics = MetricRecord(
            {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
        )
        return ArrayRecord({k: Array(v) for k, v in mean.items()}), metrics


def fold_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    folder: ReplyFolder,
    *,
    last_seconds: Mapping[int, float],
    stagger: float = 0.0,
) -> None:
    """A round's training exchange: push ``messages`` in :func:`dispatch_plan`'s
    order and fold every reply, and every silence, into ``folder`` (finished:
    its counts are final)."""
    ordered, pause = dispatch_plan(messages, last_seconds, stagger)
    exchange(
        grid,
        ordered,
        timeout,
        folder,
        on_missing=functools.partial(folder.missed, timeout=timeout),
        stagger=pause,
    )
    del ordered
    folder.finish()  # values are checked as they are folded: before counting


def collect_replies(
    grid: Grid, messages: Iterable[Message], timeout: float
) -> tuple[list[Message], list[NodeOutcome]]:
    """A round's evaluation exchange: every reply, in :func:`reply_order` (they are
    summed), and every node's outcome, silent ones last."""
    replies: list[Message] = []
    silent: list[int] = []  # nodes that did not answer in time
    exchange(grid, messages, timeout, replies.append, on_missing=silent.append)
    replies.sort(key=reply_order)
    outcomes = [outcome_of(m) for m in replies]
    outcomes += [missing(n, timeout) for n in silent]
    return replies, outcomes
