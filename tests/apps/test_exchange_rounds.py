"""A round's two exchanges built on ``exchange``: training (replies folded as they
arrive, silent nodes counted) and evaluation (replies collected in one order)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from apps.exchange import ReplyFolder, collect_replies, fold_replies, reply_order
from fedobj import keys
from tests.apps.helpers import instruction, set_task_identity
from tests.apps.test_exchange import REF, _nan_reply, _record, train_reply


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


class AnsweringGrid:
    """Each node answers its message at once with what ``answer`` builds; a node
    ``answer`` returns None for never answers."""

    def __init__(self, answer) -> None:  # noqa: ANN001
        self.answer = answer
        self.outbox: list[Message] = []
        self.pushes: list[list[int]] = []

    def push_messages(self, messages):  # noqa: ANN001
        messages = list(messages)
        self.pushes.append([m.metadata.dst_node_id for m in messages])
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pushes)}-{i}"
            content = self.answer(msg.metadata.dst_node_id)
            if content is not None:
                self.outbox.append(Message(content, reply_to=msg))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):  # noqa: ANN001
        out = [m for m in self.outbox if m.metadata.reply_to_message_id in ids]
        self.outbox = [m for m in self.outbox if m not in out]
        return out


def test_a_training_exchange_folds_every_reply_and_every_silence() -> None:
    """Nodes 11 (400 examples) and 12 (100) reply, 13 stays silent: the mean is
    (400 x 1 + 100 x 2) / 500 = 1.2 above the model; 13 is counted as timed out.
    Known training times put the messages longest first (12 before 11)."""

    def answer(node: int) -> RecordDict | None:
        if node == 13:
            return None
        shift, n = {11: (1.0, 400), 12: (2.0, 100)}[node]
        arrays = {k: v + np.float32(shift) for k, v in REF.items()}
        metrics = MetricRecord({keys.NUM_EXAMPLES: n})
        return RecordDict({keys.ARRAYS: _record(arrays), keys.METRICS: metrics})

    grid = AnsweringGrid(answer)
    folder = ReplyFolder(_record(REF))
    fold_replies(
        grid,  # type: ignore[arg-type]
        [instruction(n) for n in (11, 12, 13)],
        0.05,
        folder,
        last_seconds={11: 1.0, 12: 3.0},
    )
    assert grid.pushes == [[13, 12, 11]]  # no time for 13: first, all at once
    assert folder.valid_count == 2
    assert [(o.node_id, o.failure) for o in folder.rejected] == [(13, "timeout")]
    arrays, _ = folder.aggregate()
    assert arrays is not None
    np.testing.assert_allclose(
        arrays["head.bias"].numpy(), REF["head.bias"] + 1.2, rtol=1e-6, atol=1e-6
    )


def test_held_replies_are_aggregated_by_the_inner_strategy() -> None:
    """``stream=False`` (FedAdam, a DP wrapper): ``aggregate`` hands the kept
    replies, in their canonical order, to the inner strategy's aggregation."""
    folder = ReplyFolder(_record(REF), stream=False)
    replies = [train_reply(12, 30), train_reply(11, 10), _nan_reply(13, 5, None)]
    for r in replies:
        folder(r)
    got: list[list[Message]] = []

    def inner(valid: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        got.append(valid)
        return _record(REF), MetricRecord({"n": len(valid)})

    arrays, metrics = folder.aggregate(inner)
    assert metrics is not None and metrics["n"] == 2
    assert got == [sorted(replies[:2], key=reply_order)]
    assert [o.node_id for o in folder.rejected] == [13]
    streamed = ReplyFolder(_record(REF))
    streamed(train_reply(11, 10))
    assert streamed.aggregate(inner)[0] is not None and len(got) == 1  # not asked


def test_an_evaluation_exchange_collects_replies_in_one_order() -> None:
    def answer(node: int) -> RecordDict | None:
        if node == 13:
            return None
        metrics = {keys.NUM_EXAMPLES: 5, keys.EVAL_ACCURACY: node / 100}
        return RecordDict({keys.METRICS: MetricRecord(metrics)})

    msgs = [instruction(n, message_type=MessageType.EVALUATE) for n in (12, 11, 13)]
    replies, outcomes = collect_replies(AnsweringGrid(answer), msgs, 0.05)  # type: ignore[arg-type]
    assert replies == sorted(replies, key=reply_order) and len(replies) == 2
    # one outcome per reply, in the replies' order, then the silent node
    assert [o.node_id for o in outcomes[:2]] == [
        m.metadata.src_node_id for m in replies
    ]
    assert {o.node_id for o in outcomes[:2]} == {11, 12}
    assert outcomes[2].node_id == 13 and outcomes[2].failure == "timeout"
    assert outcomes[2].error == "no reply within 0.05 s"
