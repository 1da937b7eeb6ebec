"""The server's end of the edge link: what each message carries down, and how a
compressed reply is read.

Every model the server sends gets an id (``keys.LINK_MODEL``); a train reply
compressed by a node names the id it is an update from, and the layout digest
of that model, and is refused unless both are what this round sent that node
(an update from another round's model, or from a model of another class map,
would be folded against the wrong base).

With ``downlink-compression=int8`` the server *publishes* one chain of models:
each new model to send becomes the last published one plus an int8 delta
towards it, computed with the same float32 operations a node uses to apply it,
so the server knows exactly what every node holds, and the next delta starts
from there (the quantisation error never accumulates). A node's last reply says
which published model it holds; it is sent the deltas after that one (one, when
it took part in the last exchange; none, when the model did not change between
evaluation and training), or the whole published model when it holds none, one
too old for the chain, or one of another layout (after a head growth). One
chain, not one per group of nodes: groups that land apart would never meet
again, and a delta per group would grow without end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from apps.link_records import RecordError, pack, unpack
from fedobj import keys
from fedobj.aggregation.views import array_view
from fedobj.compression import CodecError, Layout, Update, dequantize, quantize
from fedobj.compression.codec import read_update
from fedobj.compression.quantize import seeded_rng

MAX_DELTAS = 3
"""Deltas kept on the chain: a node that missed up to this many published
models gets them all (each is a quarter of the model), else the whole model."""


@dataclass(frozen=True)
class HeldModel:
    """A model some nodes hold: its layout and its values, flat float32."""

    layout: Layout
    flat: np.ndarray


class Link:
    """The edge link of one run: ``codec`` for train replies (``none``,
    ``int8``, ``topk``), ``fraction`` for top-k, ``downlink`` (``none``,
    ``int8``); ``seed`` seeds the downlink's stochastic rounding, ``run`` names
    the run in every model id (a device's file from another run never matches)."""

    def __init__(
        self,
        codec: str,
        fraction: float,
        downlink: str,
        seed: int = 0,
        run: str = "",
    ) -> None:
        self.codec, self.fraction, self.downlink, self.seed = (
            codec,
            fraction,
            downlink,
            seed,
        )
        # the model this exchange's replies are updates from, by id
        self.models: dict[str, HeldModel] = {}
        self.held: dict[int, str] = {}  # node id -> the model id it holds
        self.sent: dict[int, str] = {}  # node id -> model id sent in this exchange
        # int8 downlink: the published models' ids, oldest first, and the
        # int8 delta that leads to each from the one before
        self.chain: list[str] = []
        self.deltas: dict[str, dict[str, np.ndarray]] = {}
        self._target: np.ndarray | None = None
        self._serial = 0
        self.run = run

    @property
    def active(self) -> bool:
        return self.codec != "none" or self.downlink != "none"

    @property
    def compresses(self) -> bool:
        """Whether train replies come compressed."""
        return self.codec != "none"

    # ------------------------------------------------------------ downlink

    def outgoing(
        self, messages: Iterable[Message], arrays: ArrayRecord, label: str
    ) -> list[Message]:
        """``messages`` as they go out: each names the model it carries (the
        base of a compressed reply); with an int8 downlink each node gets what
        takes it from the model it holds to the one published now."""
        messages = list(messages)
        if not self.active or not messages:
            return messages
        views = {k: array_view(v) for k, v in arrays.items()}
        layout = Layout.of(views)
        target = layout.flatten(views)
        if self.downlink == "none":
            current = self._new_id(label)
            self.models = {current: HeldModel(layout, target)}
        else:
            current = self._publish(layout, target, label)
        self.sent.clear()
        groups: dict[str | None, RecordDict] = {}
        out: list[Message] = []
        for message in messages:
            node = message.metadata.dst_node_id
            base = self._base_for(node)
            if base not in groups:
                groups[base] = self._content(message.content, base, current)
            self.sent[node] = current
            out.append(
                Message(
                    content=groups[base],
                    dst_node_id=node,
                    message_type=message.metadata.message_type,
                )
            )
        return out

    def _publish(self, layout: Layout, target: np.ndarray, label: str) -> str:
        """Move the published model towards ``target``: one int8 delta from
        the last published one (a new chain when the layout changed; nothing
        when the target is the last one, as when the evaluated model trains
        next). Returns the published model's id."""
        published = self.models.get(self.chain[-1]) if self.chain else None
        if published is None or published.layout != layout:
            model_id = self._new_id(label)
            self.models = {model_id: HeldModel(layout, target)}
            self.chain, self.deltas = [model_id], {}
        elif self._target is None or not np.array_equal(target, self._target):
            model_id = self._new_id(label)
            rng = seeded_rng(self.seed, model_id)
            starts = layout.chunk_starts
            q, scales = quantize(target - published.flat, starts, rng)
            landed = published.flat + dequantize(q, scales, starts)
            landed = layout.flatten(layout.unflatten(landed))  # as nodes land
            self.models = {model_id: HeldModel(layout, landed)}
            self.deltas[model_id] = {"q": q, "scale": scales}
            self.chain.append(model_id)
            for old in self.chain[: -MAX_DELTAS - 1]:
                self.deltas.pop(old, None)
            self.chain = self.chain[-MAX_DELTAS - 1 :]
        self._target = target
        return self.chain[-1]

    def _base_for(self, node: int) -> str | None:
        """The published model ``node`` holds, if the chain still reaches it
        (None: it gets the whole model)."""
        held = self.held.get(node) if self.downlink != "none" else None
        return held if held in self.chain else None

    def _content(
        self, content: RecordDict, base: str | None, current: str
    ) -> RecordDict:
        """A message's content for nodes holding ``base`` (None: the whole
        model): the deltas after it on the chain, in order (none for a node
        already holding the current model)."""
        config = ConfigRecord(dict(content.config_records[keys.CONFIG]))
        config[keys.UPDATE_COMPRESSION] = self.codec
        config[keys.DOWNLINK_COMPRESSION] = self.downlink
        if self.codec == "topk":
            config[keys.TOPK_FRACTION] = self.fraction
        config[keys.LINK_MODEL] = current
        records = dict(content.items())
        records[keys.CONFIG] = config
        if self.downlink != "none":
            published = self.models[current]
            if base is None:  # the published model, which may differ from arrays
                whole = published.layout.unflatten(published.flat)
                records[keys.ARRAYS] = ArrayRecord(
                    {k: Array(v) for k, v in whole.items()}
                )
            else:
                steps = self.chain[self.chain.index(base) + 1 :]
                arrays = {
                    f"{name}{i}": values
                    for i, step in enumerate(steps)
                    for name, values in self.deltas[step].items()
                }
                del records[keys.ARRAYS]
                records[keys.DOWNLINK] = pack(arrays)
                config[keys.DOWNLINK_BASE] = base
        return RecordDict(records)

    def _new_id(self, label: str) -> str:
        self._serial += 1
        return (
            f"{self.run}/{label}.{self._serial}"
            if self.run
            else f"{label}.{self._serial}"
        )

    # ------------------------------------------------------------ replies

    def note(self, reply: Message) -> None:
        """Learn from any reply which model its node now holds (an error reply,
        or none: it is sent the full model next time)."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.held.pop(node, None)
            return
        link = reply.content.config_records.get(keys.LINK)
        held = str(link.get("held", "")) if link is not None else ""
        if held and held == self.sent.get(node):
            self.held[node] = held
        else:
            self.held.pop(node, None)

    def forget(self, node: int) -> None:
        """A node that did not answer: what it holds is unknown."""
        self.held.pop(node, None)

    def read(self, reply: Message) -> tuple[Update, str]:
        """A compressed train reply's validated update and the id of the model
        it is an update from; raises ValueError saying why it is refused."""
        node = reply.metadata.src_node_id
        link = reply.content.config_records.get(keys.LINK)
        if keys.DELTA not in reply.content.array_records or link is None:
            raise CodecError(
                f"reply is not compressed, but the run asks update-compression="
                f"{self.codec}"
            )
        codec = str(link.get("codec", ""))
        if codec != self.codec:
            raise CodecError(
                f"reply compressed with {codec!r}, the run asks {self.codec!r}"
            )
        sent = self.sent.get(node)
        expected = self.models[sent].layout if sent in self.models else None
        if expected is None:
            raise CodecError("no model was sent to this node in this round")
        if str(link.get("layout", "")) != expected.digest:
            raise CodecError(
                "update is against a model of another class map or architecture "
                f"(layout {link.get('layout')!r}, this round's {expected.digest!r})"
            )
        base = str(link.get("base", ""))
        if base != sent:
            raise CodecError(
                f"update is against model {base!r}, this round sent {sent!r}"
            )
        try:
            arrays = unpack(
                reply.content.array_records[keys.DELTA], expected.size * 5 + 1024
            )
        except RecordError as exc:
            raise CodecError(str(exc)) from None
        return read_update(arrays, codec, expected), base

    def base(self) -> np.ndarray:
        """The flat values of the model this exchange sent (every compressed
        reply ``read`` accepts is an update from it)."""
        (held,) = self.models.values()
        return held.flat

    def dense(self, update: Update, base: str) -> ArrayRecord:
        """The model a compressed reply stands for, whole (for strategies that
        aggregate every reply together: FedAdam, Flower's DP wrappers)."""
        held = self.models[base]
        flat = held.flat + update.dense(held.layout)
        return ArrayRecord(
            {k: Array(v) for k, v in held.layout.unflatten(flat).items()}
        )
