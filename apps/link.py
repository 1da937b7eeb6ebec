"""The server's end of the edge link: what each message carries down, and how a
compressed reply is read.

Every model the server sends gets an id (``keys.LINK_MODEL``); a train reply
compressed by a node names the id it is an update from, and the layout digest
of that model, and is refused unless both are what this round sent that node
(an update from another round's model, or from a model of another class map,
would be folded against the wrong base). With ``downlink-compression=int8`` the
server remembers which model each node holds (its last reply says) and sends
the next one as an int8 delta against it: all nodes holding the same model get
the same delta, and the server computes exactly what they will hold (the same
float32 operations), so the next delta is taken from there and the quantisation
error never accumulates. A node holding nothing known, or a model of another
layout, gets the full model. The last :data:`KEPT_MODELS` models are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from apps.link_records import RecordError, pack, unpack
from fedobj import keys
from fedobj.aggregation.views import array_view
from fedobj.compression import CodecError, Layout, Update, dequantize, quantize
from fedobj.compression.codec import read_update
from fedobj.compression.quantize import seeded_rng

KEPT_MODELS = 4
"""Models the server keeps to send deltas against (each is the model's size)."""


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
        self.models: dict[str, HeldModel] = {}
        self.held: dict[int, str] = {}  # node id -> the model id it holds
        self.sent: dict[int, str] = {}  # node id -> model id sent in this exchange
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
        """``messages`` as they go out: each names the model it carries, and
        with an int8 downlink a node holding a known model gets a delta."""
        messages = list(messages)
        if not self.active or not messages:
            return messages
        views = {k: array_view(v) for k, v in arrays.items()}
        layout = Layout.of(views)
        model_id = self._new_id(label)
        self.models[model_id] = HeldModel(layout, layout.flatten(views))
        self.sent.clear()
        groups: dict[str | None, tuple[RecordDict, str]] = {}
        out: list[Message] = []
        for message in messages:
            node = message.metadata.dst_node_id
            base = self.held.get(node) if self.downlink == "int8" else None
            held = self.models.get(base) if base is not None else None
            if held is None or held.layout != layout:
                base = None
            if base not in groups:
                groups[base] = self._content(message.content, base, model_id)
            content, sent_id = groups[base]
            self.sent[node] = sent_id
            out.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=message.metadata.message_type,
                )
            )
        self._prune()
        return out

    def _content(
        self, content: RecordDict, base: str | None, model_id: str
    ) -> tuple[RecordDict, str]:
        """A message's content for nodes holding ``base`` (None: the full
        model) and the id of the model they will hold."""
        config = ConfigRecord(dict(content.config_records[keys.CONFIG]))
        config[keys.UPDATE_COMPRESSION] = self.codec
        config[keys.DOWNLINK_COMPRESSION] = self.downlink
        if self.codec == "topk":
            config[keys.TOPK_FRACTION] = self.fraction
        records = dict(content.items())
        records[keys.CONFIG] = config
        if base is None:
            config[keys.LINK_MODEL] = model_id
            return RecordDict(records), model_id
        target, held = self.models[model_id], self.models[base]
        rng = seeded_rng(self.seed, model_id, base)
        q, scales = quantize(target.flat - held.flat, held.layout.chunk_starts, rng)
        layout = held.layout
        landed = layout.flatten(
            layout.unflatten(held.flat + dequantize(q, scales, layout.chunk_starts))
        )
        landed_id = f"{model_id}<{base}"
        self.models[landed_id] = HeldModel(layout, landed)
        del records[keys.ARRAYS]
        records[keys.DOWNLINK] = pack({"q": q, "scale": scales})
        config[keys.DOWNLINK_BASE] = base
        config[keys.LINK_MODEL] = landed_id
        return RecordDict(records), landed_id

    def _new_id(self, label: str) -> str:
        self._serial += 1
        return (
            f"{self.run}/{label}.{self._serial}"
            if self.run
            else f"{label}.{self._serial}"
        )

    def _prune(self) -> None:
        """Keep the models sent in this exchange and the newest others some
        node holds (at most :data:`KEPT_MODELS`)."""
        sent = set(self.sent.values())
        held = set(self.held.values())
        others = [m for m in self.models if m in held and m not in sent]
        keep = sent | set(others[-KEPT_MODELS:])
        self.models = {m: h for m, h in self.models.items() if m in keep}
        self.held = {n: m for n, m in self.held.items() if m in self.models}

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

    def bases(self) -> Mapping[str, np.ndarray]:
        """Every kept model's flat values, by id (what an update is added to)."""
        return {m: h.flat for m, h in self.models.items()}

    def dense(self, update: Update, base: str) -> ArrayRecord:
        """The model a compressed reply stands for, whole (for strategies that
        aggregate every reply together: FedAdam, Flower's DP wrappers)."""
        held = self.models[base]
        flat = held.flat + update.dense(held.layout)
        return ArrayRecord(
            {k: Array(v) for k, v in held.layout.unflatten(flat).items()}
        )
