"""Building Flower messages outside a running app.

``Message(...)`` reads Flower's task identity (run, node, task ids), which only a
running ServerApp/ClientApp sets; tests set it once here, then build instructions and
replies exactly as the Grid would deliver them.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


def set_task_identity(run_id: int = 7) -> None:
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1


def instruction(
    node_id: int,
    content: RecordDict | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    set_task_identity()
    return Message(
        content or RecordDict({"config": ConfigRecord()}),
        dst_node_id=node_id,
        message_type=message_type,
    )


def reply(
    node_id: int, content: RecordDict, message_type: str = MessageType.TRAIN
) -> Message:
    return Message(content, reply_to=instruction(node_id, message_type=message_type))


def error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node_id))
