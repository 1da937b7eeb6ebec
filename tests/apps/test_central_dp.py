"""Central DP: Flower's wrappers inside CatalogStrategy, the node-side mod, a real run.

The strategy-level tests use the scripted Grid of ``test_catalog_strategy`` and
Flower's real wrappers and RDP accountant: clipping bounds each node's update,
nodes weigh equally, growth happens before the wrapper snapshots the arrays, an
error reply is removed before the wrapper would skip the round, the budget stops a
run and the next run continues the ledger. The e2e test runs ``flwr run`` with
client-side clipping, so Flower's ``fixedclipping_mod`` runs on the nodes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from apps.central_dp import central_dp_mod, latest_ledger, sample_size
from apps.strategy import CatalogStrategy, make_inner_strategy
from fedobj import keys
from fedobj.catalog import SyncCatalog
from fedobj.config import RunConfig
from fedobj.errors import ConfigError
from fedobj.registry import ArtifactStore
from fedobj.superlink import LocalSuperLink
from tests.apps.helpers import error_reply, instruction, set_task_identity
from tests.apps.test_catalog_strategy import ScriptedGrid, _rec, make, setup
from tests.apps.test_flwr_run_e2e import flwr_run
from tests.conftest import FIXTURE_FMNIST, free_port

__all__ = ["setup"]  # the fixture, shared with test_catalog_strategy


def _update_norm(a: ArrayRecord, b: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum((a[k].numpy() - b[k].numpy()) ** 2) for k in a)))


def nodes_send(deltas: dict[int, float], examples: dict[int, int]):  # noqa: ANN201
    """Node n returns the broadcast arrays + ``deltas[n]`` with ``examples[n]``."""

    def reply(rnd: int, node: int, msg: Message) -> Message:
        arrays = msg.content.array_records[keys.ARRAYS]
        new = {
            k: v.numpy() + np.asarray(deltas[node], v.numpy().dtype)
            for k, v in arrays.items()
        }
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: examples[node],
                keys.TRAIN_LOSS: 1.0,
                # what central_dp_mod adds on a real node
                keys.UNIT_WEIGHT: 1.0,
            }
        )
        return Message(
            RecordDict({keys.ARRAYS: _rec(new), keys.METRICS: metrics}),
            reply_to=msg,
        )

    return reply


def cfg(**kw: object) -> RunConfig:
    base: dict[str, object] = {"min_nodes": 3, "central_eval": False}
    base.update(kw)
    return RunConfig.from_flower({k.replace("_", "-"): v for k, v in base.items()})


def noiseless(mode: str, clipping_norm: float) -> RunConfig:
    """Central DP without noise: what clipping and weighting alone do is exact."""
    return cfg(
        central_dp=mode,
        central_dp_noise_multiplier=0.0,
        central_dp_clipping_norm=clipping_norm,
    )


def dp_strategy(setup, c: RunConfig, ledger=None) -> CatalogStrategy:  # noqa: ANN001
    catalog, store, args, _ = setup
    return make(
        make_inner_strategy(c, num_nodes=3, ledger=ledger),
        catalog,
        store,
        args,
        central_dp=c.privacy.central_dp,
    )


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"central_dp": "loud"}, "`central-dp` must be one of"),
        (
            {"central_dp": "server-fixed", "strategy": "perffedavg"},
            "cannot be perffedavg with central-dp",
        ),
        (
            {"central_dp": "client-adaptive", "central_dp_epsilon": 2.0},
            "accountant covers fixed clipping only",
        ),
        (
            {
                "central_dp": "server-fixed",
                "central_dp_epsilon": 2.0,
                "strategy": "fedadam",
            },
            "must be fedavg or fedprox with central-dp-epsilon",
        ),
        (
            {
                "central_dp": "server-fixed",
                "central_dp_epsilon": 2.0,
                "central_dp_noise_multiplier": 0.0,
            },
            "must be > 0 with central-dp-epsilon",
        ),
        ({"central_dp_clipping_norm": 0.0}, "`central-dp-clipping-norm` must be > 0"),
        ({"central_dp_delta": 1.0}, "`central-dp-delta` must be in (0, 1)"),
        ({"central_dp_epsilon": -1.0}, "`central-dp-epsilon` must be >= 0"),
        ({"central_dp_target_quantile": 1.5}, "`central-dp-target-quantile`"),
    ],
)
def test_bad_central_dp_settings_are_refused_before_round_one(
    kw: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg(**kw)


def test_the_wrapper_named_by_the_run_config_wraps_an_equal_weight_strategy() -> None:
    inner = make_inner_strategy(
        cfg(central_dp="client-fixed", central_dp_epsilon=3.0, fraction_train=0.3),
        num_nodes=10,
    )
    assert isinstance(inner, DifferentialPrivacyClientSideFixedClipping)
    assert inner.strategy.weighted_by_key == keys.UNIT_WEIGHT  # type: ignore[attr-defined]
    assert inner.num_sampled_clients == 3 and inner.accountant is not None
    adaptive = make_inner_strategy(
        cfg(central_dp="server-adaptive", central_dp_noise_multiplier=0.5),
        num_nodes=10,
    )
    assert isinstance(adaptive, DifferentialPrivacyServerSideAdaptiveClipping)
    with pytest.raises(ConfigError, match="needs central-dp-noise-multiplier < 1"):
        make_inner_strategy(cfg(central_dp="client-adaptive"), num_nodes=10)
    # without central DP nothing changes: weighted by examples, not wrapped
    plain = make_inner_strategy(cfg())
    assert plain.weighted_by_key == keys.NUM_EXAMPLES  # type: ignore[attr-defined]
    assert sample_size(10, cfg(fraction_train=0.5)) == 5
    with pytest.raises(ConfigError, match="only 2 are connected"):
        make_inner_strategy(cfg(central_dp="server-fixed"), num_nodes=2)


# ---------------------------------------------------------------- the round loop


def test_server_side_clipping_bounds_each_update_and_weighs_nodes_equally(
    setup,  # noqa: ANN001
) -> None:
    catalog, store, args, initial = setup
    c = noiseless("server-fixed", 1e6)
    strategy = dp_strategy(setup, c)
    small = {11: 1e-3, 12: 2e-3, 13: 3e-3}
    grid = ScriptedGrid(nodes_send(small, {11: 10, 12: 100, 13: 1000}))
    out = strategy.start(grid, initial, num_rounds=1)
    assert out.arrays is not None
    head = out.arrays["classifier.bias"].numpy() - initial["classifier.bias"].numpy()
    # equal weights: the mean of the deltas, not their example-weighted mean (2.9e-3)
    np.testing.assert_allclose(head, 2e-3, rtol=1e-4)
    config = grid.sent[1][0].content.config_records[keys.CONFIG]
    assert config[keys.CENTRAL_DP] == "server-fixed"

    # a bound far below the updates: every node's update is clipped to it, so the
    # mean (all updates point the same way) has exactly that norm
    c = noiseless("server-fixed", 0.5)
    strategy = dp_strategy(setup, c)
    out = strategy.start(
        ScriptedGrid(nodes_send({11: 1.0, 12: 2.0, 13: 3.0}, {11: 1, 12: 1, 13: 1})),
        initial,
        num_rounds=1,
    )
    assert out.arrays is not None
    assert _update_norm(out.arrays, initial) == pytest.approx(0.5, rel=1e-4)


def test_growth_lands_before_the_wrapper_and_errors_never_reach_it(setup) -> None:  # noqa: ANN001
    catalog, store, args, initial = setup
    c = noiseless("server-fixed", 1e6)
    strategy = dp_strategy(setup, c)
    send = nodes_send({11: 1.0, 12: 1.0, 13: 1.0}, {11: 5, 12: 5, 13: 5})

    def node_13_fails_in_round_2(rnd: int, node: int, msg: Message) -> Message:
        if rnd == 2 and node == 13:
            return error_reply(node, "disk full")
        return send(rnd, node, msg)

    grid = ScriptedGrid(node_13_fails_in_round_2)
    grid.after_round[1] = lambda: catalog.add_category("Sneaker")
    out = strategy.start(grid, initial, num_rounds=2)
    assert out.arrays is not None
    w = out.arrays["classifier.weight"].numpy()
    assert w.shape[0] == 7  # grown before the wrapper snapshotted round 2's arrays
    # Flower's wrapper skips a round with any error reply; ours never sees it, so
    # round 2 moved the model (old rows: +1 per round)
    np.testing.assert_allclose(
        w[:6], initial["classifier.weight"].numpy() + 2.0, rtol=1e-5
    )
    r2 = [r for r in catalog.rounds("run-1") if r.round == 2][0]
    assert r2.nodes_replied == 2 and r2.nodes_rejected == 1


def test_the_budget_stops_the_run_and_the_next_run_continues_the_ledger(
    setup,  # noqa: ANN001
) -> None:
    catalog, store, args, initial = setup
    send = nodes_send({11: 0.01, 12: 0.01, 13: 0.01}, {11: 5, 12: 5, 13: 5})
    common = dict(
        central_dp="server-fixed",
        central_dp_noise_multiplier=2.0,
        central_dp_clipping_norm=0.1,
    )
    # room for exactly two releases at this noise (one costs ~2.5 at delta 1e-5)
    strategy = dp_strategy(setup, cfg(**common, central_dp_epsilon=4.0))
    strategy.start(ScriptedGrid(send), initial, num_rounds=5)
    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    spent = [v.provenance["central_dp"]["epsilon"] for v in versions]
    assert [v.round for v in versions] == [1, 2] and 0 < spent[0] < spent[1] <= 4.0
    assert versions[1].metrics["central-dp-epsilon"] == pytest.approx(spent[1])
    ledger = latest_ledger(catalog)
    assert ledger is not None and len(ledger["compositions"]) >= 1

    # the next run (a resume) with the same budget: the ledger is continued, so
    # nothing is released
    again = dp_strategy(setup, cfg(**common, central_dp_epsilon=4.0), ledger=ledger)
    again.start(
        ScriptedGrid(send), initial, num_rounds=2, first_round=3, class_map=None
    )
    assert len(catalog.list_versions()) == 2
    # a bigger budget continues from what was spent, not from zero
    more = dp_strategy(setup, cfg(**common, central_dp_epsilon=5.0), ledger=ledger)
    more.start(ScriptedGrid(send), initial, num_rounds=1, first_round=3)
    newest = max(catalog.list_versions(), key=lambda v: v.round)
    assert newest.round == 3
    assert newest.provenance["central_dp"]["epsilon"] > spent[1]
    assert newest.provenance["central_dp"]["releases"] == 3


@pytest.mark.parametrize(("delta", "grows"), [(1.0, True), (1e-6, False)])
def test_the_adaptive_bound_moves_towards_the_updates(
    setup,  # noqa: ANN001
    delta: float,
    grows: bool,
) -> None:
    """Updates far above the bound raise it, far below lower it (Andrew et al.);
    Flower 1.41 alone moves it the other way (apps/central_dp.py)."""
    catalog, store, args, initial = setup
    c = noiseless("server-adaptive", 0.1)
    strategy = dp_strategy(setup, c)
    send = nodes_send({11: delta, 12: delta, 13: delta}, {11: 1, 12: 1, 13: 1})
    strategy.start(ScriptedGrid(send), initial, num_rounds=3)
    bound = strategy.inner.clipping_norm  # type: ignore[attr-defined]
    assert (bound > 0.1) if grows else (bound < 0.1), bound
    assert bound == pytest.approx(0.1 * np.exp((0.2 if grows else -0.2) * 0.5 * 3))


# ---------------------------------------------------------------- the node side


def _train_message(mode: str, clip: float | None) -> tuple[Message, ArrayRecord]:
    set_task_identity()
    sent = _rec({"w": np.zeros(100, np.float32)})
    config = ConfigRecord({keys.CENTRAL_DP: mode})
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    msg = instruction(7, RecordDict({keys.ARRAYS: sent, keys.CONFIG: config}))
    return msg, sent


def _trains(msg: Message, ctxt: Context) -> Message:
    """What train_fn returns: the model moved by 1 in every weight."""
    arrays = msg.content.array_records[keys.ARRAYS]
    moved = _rec({k: v.numpy() + 1.0 for k, v in arrays.items()})
    metrics = MetricRecord({keys.NUM_EXAMPLES: 40})
    return Message(
        RecordDict({keys.ARRAYS: moved, keys.METRICS: metrics}), reply_to=msg
    )


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_client_side_modes_clip_on_the_node_and_weigh_one(mode: str) -> None:
    msg, sent = _train_message(mode, clip=0.25)
    reply = central_dp_mod(msg, Context(7, 7, {}, RecordDict(), {}), _trains)
    assert not reply.has_error()
    got = reply.content.array_records[keys.ARRAYS]
    assert _update_norm(got, sent) == pytest.approx(0.25, rel=1e-5)  # was 10
    metrics = reply.content.metric_records[keys.METRICS]
    assert metrics[keys.UNIT_WEIGHT] == 1.0 and metrics[keys.NUM_EXAMPLES] == 40
    if mode == "client-adaptive":
        assert metrics[KEY_NORM_BIT]  # Flower's bit: this update was clipped


def test_server_side_modes_and_plain_runs_leave_the_update_alone() -> None:
    ctxt = Context(7, 7, {}, RecordDict(), {})
    msg, sent = _train_message("server-fixed", clip=None)
    reply = central_dp_mod(msg, ctxt, _trains)
    got = reply.content.array_records[keys.ARRAYS]
    assert _update_norm(got, sent) == pytest.approx(10.0)
    assert reply.content.metric_records[keys.METRICS][keys.UNIT_WEIGHT] == 1.0
    msg, sent = _train_message("", clip=None)
    reply = central_dp_mod(msg, ctxt, _trains)
    assert keys.UNIT_WEIGHT not in reply.content.metric_records[keys.METRICS]
    evaluate = instruction(
        7, RecordDict({keys.CONFIG: ConfigRecord()}), MessageType.EVALUATE
    )
    assert central_dp_mod(evaluate, ctxt, lambda m, c: m) is evaluate


# ---------------------------------------------------------------- a real run


@pytest.mark.e2e
def test_flwr_run_with_client_side_clipping_bounds_every_round(
    tmp_path: Path,
) -> None:
    """Flower's ``fixedclipping_mod`` runs on the nodes: with no noise, each
    round's equal-weight mean of clipped updates moves the model by at most the
    bound (plain SGD moves it by far more). The accountant and the budget are
    covered above with the same Flower wrappers; noise large enough for a finite
    epsilon would hide the bound here."""
    link = LocalSuperLink(
        tmp_path / "flwr-home",
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(tmp_path / "outputs"),
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
        },
    )
    link.start()
    try:
        db = tmp_path / "cdp.db"
        proc = flwr_run(
            link,
            f'num-server-rounds=2 min-nodes=3 database-url="sqlite:///{db}" '
            'partitioner="iid" central-dp="client-fixed" '
            "central-dp-clipping-norm=0.05 central-dp-noise-multiplier=0.0",
        )
    finally:
        assert link.stop()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "round 2/2: 3/3 nodes replied" in log, log[-3000:]
    assert "round 2: central DP (client-fixed) clipping norm 0.0500" in log
    catalog = SyncCatalog(db)
    versions = sorted(catalog.list_versions(), key=lambda v: v.round)
    assert [v.round for v in versions] == [1, 2]
    store = ArtifactStore(tmp_path / "outputs")
    w = [
        store.load_checkpoint(v.checkpoint_uri, v.checkpoint_sha256).state_dict
        for v in versions
    ]
    moved = float(
        torch.sqrt(sum(((w[1][k] - w[0][k]).double() ** 2).sum() for k in w[0]))
    )
    assert 0 < moved <= 0.05 * (1 + 1e-4), moved
