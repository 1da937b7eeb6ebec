"""SecAgg+ mode: Flower's real protocol gives the example-weighted mean.

Unit tests run Flower's own ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod``
(nodes: key agreement, Shamir shares, masks, quantisation) in this process: a
loopback ``Grid`` hands each message, copied as the wire would, to a real
``ClientApp`` per node and keeps each node's ``Context`` between stages. Only the
transport is local; every byte of the protocol is Flower's. The end-to-end tests run
the same through ``flwr run`` (SuperLink, Ray, the project's ClientApp).

The bound checked (derived in ``apps/secagg.py``): with quantisation range T,
clipping range c, max weight W, k nodes and N examples in all,
|secure mean - weighted mean| < 3 c k / (T N / W - k / 2), plus float32 rounding.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client import ClientApp as LegacyClientApp
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar
from flwr.serverapp import Grid

from apps.secagg import SecAggSettings, secure_round
from apps.secagg_client import secaggplus_route_mod
from fedobj import keys
from fedobj.catalog import SyncCatalog
from fedobj.config import RunConfig
from fedobj.data.categories import FASHION_MNIST_NAMES
from fedobj.errors import ConfigError
from fedobj.model import load_checkpoint
from tests.apps.helpers import instruction, set_task_identity
from tests.apps.test_catalog_e2e import finish, wait_for_round
from tests.apps.test_flwr_run_e2e import superlink  # noqa: F401  (fixture)
from tests.conftest import ROOT

COUNTS = (6000, 600, 50)  # a large, a small and a tiny node (Fashion-MNIST sized)
SHAPES = {  # the CNN's layers, the hidden layer cut to keep the test fast
    "features.0.0.weight": (32, 1, 3, 3),
    "features.0.1.weight": (32,),  # GroupNorm gains: values near 1
    "features.0.1.bias": (32,),
    "hidden.2.weight": (128, 400),
    "classifier.weight": (10, 128),
    "classifier.bias": (10,),
}


def node_update(seed: int) -> dict[str, np.ndarray]:
    """Weights ~N(0, 0.05), GroupNorm gains ~1, and a few values near +-1."""
    rng = np.random.default_rng(seed)
    out = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in SHAPES.items()}
    out["features.0.1.weight"] += np.float32(1.0)
    out["hidden.2.weight"].flat[:4] = [0.97, -0.99, 1.02, -1.04]
    return out


def weighted_mean(
    updates: list[dict[str, np.ndarray]], weights: Iterable[float]
) -> dict[str, np.ndarray]:
    w = np.asarray(list(weights), dtype=np.float64)
    return {
        n: sum(wi * u[n].astype(np.float64) for wi, u in zip(w, updates)) / w.sum()
        for n in SHAPES
    }


def bound(c: float, t: int, w: float, k: int, n_total: float) -> float:
    return 3 * c * k / (t * n_total / w - k / 2) + 1e-6  # + float32 rounding


class LoopbackGrid(Grid):
    """Delivers each message to its node's ClientApp in this process.

    A copy of the message is delivered (as the wire would: the workflow shares one
    content object between nodes); an exception becomes an error reply, as in
    Flower's ClientApp runtime.
    """

    def __init__(self, nodes: dict[int, tuple[Callable[..., Message], Context]]):
        self.nodes = nodes
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self) -> Any:
        return type("Run", (), {"run_id": 7})()

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            app, context = self.nodes[msg.metadata.dst_node_id]
            delivered = copy.deepcopy(msg)
            try:
                reply = app(delivered, context)
            except Exception as exc:  # noqa: BLE001 - Flower's runtime does the same
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=delivered)
            ids.append(f"m{len(self._replies)}")
            self._replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def our_node(update: dict[str, np.ndarray], n: int, seen: list[RecordDict]) -> Any:
    """The project's route: secaggplus_route_mod on a Message-API train handler."""
    app = ClientApp()

    @app.train(mods=[secaggplus_route_mod])
    def train(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.5})
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}),
                keys.METRICS: metrics,
            }
        )
        return Message(content, reply_to=msg)

    return app


def flower_node(update: dict[str, np.ndarray], n: int) -> Any:
    """Flower's own legacy client, as in its SecAgg+ example: no weight cap."""

    class Fixed(NumPyClient):
        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            return [update[k] for k in SHAPES], n, {}

    return LegacyClientApp(
        client_fn=lambda context: Fixed().to_client(), mods=[secaggplus_mod]
    )


def run_round(
    settings: SecAggSettings,
    apps: list[Any],
    run_config: dict[str, Any],
) -> Any:
    set_task_identity()
    ids = [101 + i for i in range(len(apps))]
    nodes = {
        nid: (app, Context(7, nid, {}, RecordDict(), run_config))
        for nid, app in zip(ids, apps)
    }
    broadcast = ArrayRecord(
        {k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}
    )
    config = ConfigRecord({keys.CLASS_MAP: '{"fake": "map"}', keys.LR: 0.03})
    content = RecordDict({keys.ARRAYS: broadcast, keys.CONFIG: config})
    messages = [instruction(nid, content) for nid in ids]
    return secure_round(
        LoopbackGrid(nodes), settings.workflow(None), 1, messages, broadcast
    )


def settings_for(c: float, w: float) -> SecAggSettings:
    cfg = RunConfig.from_flower(
        {
            "secagg": True,
            "min-nodes": 3,
            "secagg-clipping-range": c,
            "secagg-max-weight": w,
        }
    )
    return SecAggSettings.from_config(cfg)


def max_error(result: Any, expected: dict[str, np.ndarray]) -> float:
    got = {k: v.numpy() for k, v in result.arrays.items()}
    return max(float(np.abs(got[k] - expected[k]).max()) for k in SHAPES)


@pytest.mark.parametrize("counts", [COUNTS, (6000, 600, 50, 1200)])
def test_secure_mean_equals_weighted_mean_within_quantisation_bound(
    counts: tuple[int, ...],
) -> None:
    settings = settings_for(c=8.0, w=100_000)  # the run config's defaults
    updates = [node_update(i) for i in range(len(counts))]
    seen: list[RecordDict] = []
    apps = [our_node(u, n, seen) for u, n in zip(updates, counts)]
    result = run_round(settings, apps, {})

    assert result.arrays is not None and not result.dropped
    assert result.total_weight == sum(counts)
    expected = weighted_mean(updates, counts)
    err = max_error(result, expected)
    limit = bound(8.0, settings.quantization_range, 100_000, len(counts), sum(counts))
    assert err < limit, (err, limit)
    assert limit < 5e-4  # the bound is useful for weights of scale 0.05
    assert err > 0  # it really went through quantisation
    plain = weighted_mean(updates, [1] * len(counts))  # not just any mean
    assert max(float(np.abs(plain[k] - expected[k]).max()) for k in SHAPES) > 100 * (
        limit
    )
    # each node trained on the server's named arrays and its config (class map)
    assert len(seen) == len(counts)
    for content in seen:
        assert list(content.array_records[keys.ARRAYS]) == list(SHAPES)
        assert content.config_records[keys.CONFIG][keys.CLASS_MAP] == '{"fake": "map"}'
    # what the server saw in the clear: counts and metrics, no arrays
    metrics = {o.node_id: o.metrics for o in result.replied}
    assert sorted(m[keys.NUM_EXAMPLES] for m in metrics.values()) == sorted(counts)
    assert all(m[keys.SECAGG_CLIPPED] == 0 for m in metrics.values())


@pytest.mark.parametrize(
    "c,counts",
    [
        (2.0, COUNTS),  # a clipping range that fits these weights (|x| <= 1.1)
        (8.0, (10_000, 600, 50)),  # Flower's defaults; a 10,000-image node
    ],
)
def test_flower_default_max_weight_is_not_the_weighted_mean(
    c: float, counts: tuple[int, ...]
) -> None:
    """Flower's max_weight=1000: a node with n > 1000 scales its values by n/1000
    before clipping to [-c, c]; values near 1 no longer fit and the mean is wrong
    (Flower only logs a warning). Our max weight gives the mean."""
    updates = [node_update(i) for i in range(3)]
    expected = weighted_mean(updates, counts)
    t = 4_194_304

    flower = run_round(
        settings_for(c, 1000), [flower_node(u, n) for u, n in zip(updates, counts)], {}
    )
    assert flower.arrays is not None
    flower_err = max_error(flower, expected)
    assert flower_err > 0.1, flower_err  # GroupNorm gains come out far too small

    ours = run_round(
        settings_for(c, 100_000),
        [our_node(u, n, []) for u, n in zip(updates, counts)],
        {"secagg-max-weight": 100_000.0, "secagg-clipping-range": c},
    )
    assert max_error(ours, expected) < bound(c, t, 100_000, 3, sum(counts))


def test_our_nodes_cap_their_weight_instead_of_corrupting_the_sum() -> None:
    """With max weight 1000 our 6,000-image node counts as 1000 (it says so in its
    metrics); the result is the mean weighted by min(n, 1000), never clipped."""
    updates = [node_update(i) for i in range(3)]
    result = run_round(
        settings_for(2.0, 1000),
        [our_node(u, n, []) for u, n in zip(updates, COUNTS)],
        {"secagg-max-weight": 1000.0, "secagg-clipping-range": 2.0},
    )
    capped = [min(n, 1000) for n in COUNTS]
    err = max_error(result, weighted_mean(updates, capped))
    assert err < bound(2.0, 4_194_304, 1000, 3, sum(capped))
    assert result.total_weight == sum(capped)
    assert sorted(o.metrics[keys.NUM_EXAMPLES] for o in result.replied) == sorted(
        COUNTS
    )


def test_values_outside_the_clipping_range_are_counted() -> None:
    updates = [node_update(i) for i in range(3)]
    updates[0]["classifier.bias"][:3] = [3.0, -3.5, 2.5]
    result = run_round(
        settings_for(2.0, 100_000),
        [our_node(u, n, []) for u, n in zip(updates, COUNTS)],
        {"secagg-clipping-range": 2.0},
    )
    clipped = sorted(o.metrics[keys.SECAGG_CLIPPED] for o in result.replied)
    assert clipped == [0, 0, 3]


def test_a_node_that_fails_to_train_drops_out_and_the_rest_are_averaged() -> None:
    """One of four nodes errors in the training stage: SecAgg+ reconstructs its
    masks from the others' shares (threshold 3 of 4) and averages the three."""
    counts = (6000, 600, 50, 1200)
    updates = [node_update(i) for i in range(4)]
    apps = [our_node(u, n, []) for u, n in zip(updates, counts)]
    broken = ClientApp()

    @broken.train(mods=[secaggplus_route_mod])
    def fail(msg: Message, context: Context) -> Message:
        return Message(Error(code=0, reason="unreadable image"), reply_to=msg)

    result = run_round(settings_for(8.0, 100_000), [*apps[:3], broken], {})
    assert [o.node_id for o in result.dropped] == [104]
    expected = weighted_mean(updates[:3], counts[:3])
    assert max_error(result, expected) < bound(
        8.0, 4_194_304, 100_000, 3, sum(counts[:3])
    )


def test_settings_arithmetic_and_refusals() -> None:
    s = settings_for(8.0, 100_000)
    assert s.max_nodes == 1023  # (2**32 - 1) // 2**22
    assert s.check_nodes(3) == (3, 2)
    assert s.check_nodes(4) == (4, 3)
    with pytest.raises(ConfigError, match="overflow the 2\\*\\*32 modulus"):
        s.check_nodes(1024)
    with pytest.raises(ConfigError, match=">= 3 nodes"):
        s.check_nodes(2)
    shares5 = SecAggSettings.from_config(
        RunConfig.from_flower({"secagg": True, "min-nodes": 5, "secagg-num-shares": 5})
    )
    with pytest.raises(ConfigError, match="even 4|5 shares for 4"):
        shares5.check_nodes(4)


@pytest.mark.parametrize(
    "override,key",
    [
        ({"strategy": "perffedavg"}, "strategy"),
        ({"strategy": "fedadam"}, "strategy"),
        ({"dp": True}, "dp"),
        ({"norm": "batch"}, "norm"),
        ({"min-nodes": 2}, "min-nodes"),
        ({"secagg-num-shares": 4.0, "min-nodes": 3}, "secagg-num-shares"),
        (
            {
                "secagg-reconstruction-threshold": 5,
                "secagg-num-shares": 5,
                "min-nodes": 5,
            },
            "secagg-reconstruction-threshold",
        ),
        ({"secagg-quantization-range": 2**31}, "secagg-quantization-range"),
        ({"secagg-quantization-range": 2**30, "min-nodes": 4}, "min-nodes"),
        ({"secagg-max-weight": 0}, "secagg-max-weight"),
    ],
)
def test_run_config_refuses_what_secagg_cannot_hold(
    override: dict[str, Any], key: str
) -> None:
    base: dict[str, Any] = {"secagg": True, "min-nodes": 3}
    with pytest.raises(ConfigError, match=f"run config `{key}`"):
        RunConfig.from_flower({**base, **override})


# ---------------------------------------------------------------- end to end

e2e = pytest.mark.e2e


def _run(link: Any, run_config: str, nodes: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        link.run_command(ROOT, nodes, run_config),
        env=link.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@e2e
def test_flwr_run_with_secagg_registers_versions_and_grows_the_head(
    superlink: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    link, _ = superlink
    db = tmp_path / "secagg.db"
    proc = _run(
        link,
        f'secagg=true database-url="sqlite:///{db}" min-nodes=3 '
        'num-server-rounds=3 partitioner="iid" fraction-evaluate=1.0 '
        "initial-categories=8",
        nodes=3,
    )
    catalog = SyncCatalog(db)
    wait_for_round(catalog, 1, proc, timeout_s=400)
    for name in FASHION_MNIST_NAMES[8:]:
        catalog.add_category(name)
    log = finish(proc, timeout_s=400)

    assert "SecAgg+: 3 nodes per round" in log, log[-3000:]
    assert "Secure aggregation completed" in log, log[-3000:]
    print("\n".join(line for line in log.splitlines() if "fedobj:" in line))
    assert "round 3/3: 3/3 nodes replied" in log, log[-3000:]
    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    assert [v.round for v in versions] == [1, 2, 3]
    # the adds land between rounds: a later round's snapshot grows the head
    sizes = [v.class_map.num_classes for v in versions]
    assert sizes[0] == 8 and sizes[-1] == 10 and sizes == sorted(sizes), sizes
    assert "head grew 8->" in log
    ck = load_checkpoint(versions[-1].checkpoint_uri)
    assert ck.state_dict["classifier.weight"].shape[0] == 10
    assert ck.class_map == versions[-1].class_map
    assert versions[-1].metrics["accuracy"] > 0.2  # chance: 0.10
    rounds = catalog.rounds(versions[0].run_id)
    assert [r.status for r in rounds] == ["completed"] * 3
    assert all(r.nodes_replied == 3 for r in rounds)


@e2e
@pytest.mark.parametrize(
    "run_config,nodes,expected",
    [
        ('strategy="perffedavg" min-nodes=3', 3, "run config `strategy`"),
        ("min-nodes=2", 2, "run config `min-nodes`"),
        # 4 nodes would overflow the modulus at 2**30 levels: found once they connect
        ("min-nodes=3 secagg-quantization-range=1073741824", 4, "overflow the 2**32"),
    ],
)
def test_flwr_run_refuses_before_round_one(
    superlink: Any,  # noqa: F811
    tmp_path: Path,
    run_config: str,
    nodes: int,
    expected: str,
) -> None:
    link, _ = superlink
    db = tmp_path / "refused.db"
    proc = _run(link, f'secagg=true database-url="sqlite:///{db}" {run_config}', nodes)
    out, _ = proc.communicate(timeout=300)
    assert expected in out, out[-3000:]
    assert "Secure aggregation commencing" not in out
    assert not db.exists() or not SyncCatalog(db).list_versions()
