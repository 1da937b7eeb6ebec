"""PerfFedAvg: FedAvg whose weights also reward nodes whose local model performs.

From the seed design: eta_k = alpha * n_k / sum(n) + (1 - alpha) * acc_k / sum(acc),
where ``acc_k`` is node k's accuracy on its own held-out images after local
training (``local-accuracy`` in its train reply). With ``alpha = 1``, or when no node
reports an accuracy, it is exactly FedAvg. The maths is
``fedobj.aggregation.perf_fedavg_weights``; the average is the streaming one (each
validated reply folded in and dropped).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedobj import keys
from fedobj.aggregation import StreamingMean, perf_fedavg_weights


class PerfFedAvg(FedAvg):
    """FedAvg with performance-aware weights (``perf-alpha`` in the run config)."""

    def __init__(self, *, perf_alpha: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= perf_alpha <= 1.0:
            raise ValueError(f"perf-alpha must be in [0, 1], got {perf_alpha}")
        self.perf_alpha = perf_alpha
        self.last_weights: list[float] = []

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> PerfFedAvg alpha: %.2f", self.perf_alpha)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        metrics = [m.content.metric_records[keys.METRICS] for m in valid]
        n = [float(m[self.weighted_by_key]) for m in metrics]  # type: ignore[arg-type]
        acc = [
            float(m[keys.LOCAL_ACCURACY]) if keys.LOCAL_ACCURACY in m else None
            for m in metrics
        ]
        weights = perf_fedavg_weights(n, acc, self.perf_alpha)
        self.last_weights = [float(w) for w in weights]
        first = valid[0].content.array_records[self.arrayrecord_key]
        mean = StreamingMean({k: v.numpy() for k, v in first.items()})
        for msg, w in zip(valid, weights, strict=True):
            if w < 1e-30:  # weighs nothing (accuracy 0 with alpha 0)
                continue
            record = msg.content.array_records[self.arrayrecord_key]
            mean.add(
                {k: v.numpy() for k, v in record.items()},
                float(w),
                msg.metadata.src_node_id,
            )
        for node, reason in mean.flush():
            log(
                WARNING,
                "round %d: reply from node %s left out: %s",
                server_round,
                node,
                reason,
            )
        if mean.count == 0:
            return None, None
        arrays = ArrayRecord({k: Array(v) for k, v in mean.result().items()})
        return arrays, self.train_metrics_aggr_fn(
            [m.content for m in valid], self.weighted_by_key
        )
