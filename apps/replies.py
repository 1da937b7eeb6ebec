"""What a reply says: its outcome, its counts, the weight it may carry.

Reading a reply is separate from moving it (:mod:`apps.exchange` pushes, pulls and
folds): the round's bookkeeping and the reply folder ask the same questions of a
reply (which node, what it counted, why it is not used) and must get the same
answers. Counts are held to what the catalog can store (:data:`MAX_COUNT`); a
label histogram must add up to the reply's example count.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedobj import keys

UNAVAILABLE_CODES = frozenset(
    {
        ErrorCode.NODE_UNAVAILABLE,  # the node stopped sending heartbeats
        ErrorCode.MESSAGE_UNAVAILABLE,  # the instruction expired or was deleted
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,  # the reply expired before the pull
    }
)
"""Error codes the SuperLink itself replies with when a node cannot answer."""


@dataclass
class NodeOutcome:
    """What a reply said (metrics, label histogram) or why it was not used.

    ``failure`` classifies an unused reply for counts and logs: ``"unavailable"``
    (the SuperLink says the node is offline or the message expired),
    ``"timeout"`` (no reply within the round's timeout), ``"error"`` (the node
    replied with an error: it declined, or could not read its data) or
    ``"invalid"`` (the reply failed validation); None for a used reply.
    """

    node_id: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    failure: str | None = None


def failure_of(msg: Message) -> str:
    """``"unavailable"`` for the SuperLink's own error replies, else ``"error"``."""
    return "unavailable" if msg.error.code in UNAVAILABLE_CODES else "error"


def missing(node_id: int, timeout: float) -> NodeOutcome:
    """The outcome of a node that did not reply before the deadline."""
    return NodeOutcome(
        node_id, error=f"no reply within {timeout:g} s", failure="timeout"
    )


ORDER_TAIL_BYTES = 256


def reply_order(msg: Message) -> tuple[int, bytes, str]:
    """A sort key that puts replies in the same order whichever came first.

    Aggregations sum floats, and float addition is not associative: summed in
    arrival order (a race between nodes), two runs of one seed part ways at
    the last bit and then further. The key is what the reply says: the last
    bytes of each of its arrays, then its metrics (wall-clock times left out),
    never the node id (Flower draws those afresh in every simulation).
    """
    if msg.has_error():
        return (1, b"", f"{msg.error.code}:{msg.error.reason}")
    content = msg.content
    metrics = [
        (name, sorted((k, v) for k, v in record.items() if not k.endswith("seconds")))
        for name, record in sorted(content.metric_records.items())
    ]
    tail = b"".join(
        bytes(content.array_records[name][key].data[-ORDER_TAIL_BYTES:])
        for name in sorted(content.array_records)
        for key in sorted(content.array_records[name])
    )
    return (0, tail, repr(metrics))


def outcome_of(msg: Message) -> NodeOutcome:
    """A reply's numeric metrics and label histogram, or its error."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return NodeOutcome(node, error=str(msg.error.reason), failure=failure_of(msg))
    values: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        for k, v in record.items():
            if isinstance(v, (int, float)):
                values[k] = float(v)
    hist = msg.content.config_records.get(keys.LABEL_HISTOGRAM)
    # a count that is not a non-negative integer says nothing true about the
    # node's images (and would make the catalog refuse the whole histogram)
    labels = (
        {
            str(k): int(v)
            for k, v in hist.items()
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT
        }
        if hist is not None
        else {}
    )
    return NodeOutcome(node, values, labels=labels)


MAX_COUNT = 2**53
"""The largest example or image count a reply may claim: float64 holds every
integer up to it, and the catalog's 64-bit INTEGER columns hold it (a larger one
made the round's bookkeeping raise and the run abort)."""


def count_of(value: object) -> int:
    """A reported count as the catalog stores it: 0 for anything that is not
    a finite number in [0, MAX_COUNT] (an evaluate reply's count is not checked
    elsewhere, and a NaN or 1e19 made ``int()`` or SQLite raise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if not (math.isfinite(value) and 0 <= value <= MAX_COUNT):
        return 0
    return int(value)


def reply_weight(msg: Message) -> tuple[float, None] | tuple[None, str]:
    """A train reply's example count if it is a reply that may be aggregated
    at all (no error, model arrays, a positive finite count; contract 5), else
    None and the reason. Its arrays are checked where they are folded."""
    if msg.has_error():
        return None, f"error reply: {msg.error.reason}"
    content = msg.content
    if keys.ARRAYS not in content.array_records and (
        keys.DELTA not in content.array_records
    ):
        return None, "reply has no model arrays"
    metrics = content.metric_records.get(keys.METRICS)
    n = metrics.get(keys.NUM_EXAMPLES) if metrics is not None else None
    if not (isinstance(n, (int, float)) and math.isfinite(n)):
        return None, f"num-examples is not a finite number ({n!r})"
    if n < 1e-30:  # too small to weigh in float32 (and not a count)
        return None, f"num-examples must be > 0 (at least 1e-30), got {n}"
    if n > MAX_COUNT:
        return None, f"num-examples is implausibly large ({n})"
    return float(n), None


def histogram_problem(
    labels: Mapping[str, int], examples: float, slugs: Collection[str] | None = None
) -> str | None:
    """Why a reply's label histogram says nothing true, if it does not.

    It counts the images the node trained on, so it must add up to the reply's
    example count, and (given the round's class-map ``slugs``) name only those:
    one that does not would skew the catalog's ``sample_count`` for good.
    """
    total = sum(labels.values())
    if total != examples:
        return (
            f"its label histogram counts {total} images, its num-examples {examples:g}"
        )
    unknown = set(labels).difference(slugs) if slugs is not None else set()
    if unknown:
        return (
            f"its label histogram names slugs outside the class map: {sorted(unknown)}"
        )
    return None


def weighs_examples(msg: Message) -> bool:
    """Whether an evaluate reply can enter Flower's metric mean: no error and a
    positive example count (Flower divides by the summed counts)."""
    if msg.has_error():
        return False
    metrics = msg.content.metric_records.get(keys.METRICS)
    value = metrics.get(keys.NUM_EXAMPLES) if metrics is not None else None
    return isinstance(value, (int, float)) and float(value) > 0
