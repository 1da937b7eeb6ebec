"""DP-SGD on the devices through a real `flwr run` (Ray simulation).

The devices' ledgers live under the SuperLink's ``FEDOBJ_CACHE_DIR`` (a temp dir
here), keyed by device identity and, for simulated devices, by run. A first run
spends budget and reports it; a second run (resume) against a budget that is
already spent is declined by every device, the server logs why and the round
still completes; a third, new simulation has new virtual devices whose budgets
are unspent, so the same budget lets every one train.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedobj.catalog import SyncCatalog
from fedobj.launch import STARTED
from fedobj.privacy import PrivacyLedger
from fedobj.superlink import LocalSuperLink
from tests.apps.test_flwr_run_e2e import flwr_run
from tests.conftest import FIXTURE_FMNIST, free_port

pytestmark = pytest.mark.e2e
EPS = re.compile(r"round (\d+): node \d+ DP epsilon ([\d.]+)")


@pytest.fixture(scope="module")
def dp_link(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("device-cache")
    link = LocalSuperLink(
        tmp_path_factory.mktemp("flwr-home"),
        free_port(),
        free_port(),
        {
            "FEDOBJ_OUTPUTS_DIR": str(tmp_path_factory.mktemp("outputs")),
            "FEDOBJ_FASHION_MNIST_DIR": str(FIXTURE_FMNIST),
            "FEDOBJ_CACHE_DIR": str(cache),
        },
    )
    link.start()
    yield link, cache
    assert link.stop()


def test_dp_budget_is_spent_reported_kept_and_enforced(dp_link, tmp_path: Path) -> None:  # noqa: ANN001
    link, cache = dp_link
    db = tmp_path / "dp.db"
    common = (
        f'database-url="sqlite:///{db}" min-nodes=2 fraction-evaluate=1.0 '
        'partitioner="iid" dp=true dp-noise-multiplier=1.0 dp-max-grad-norm=1.0'
    )
    first = flwr_run(link, f"num-server-rounds=2 dp-epsilon=50.0 {common}", nodes=2)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    spent = [(int(r), float(e)) for r, e in EPS.findall(log)]
    assert {r for r, _ in spent} == {1, 2}, log[-3000:]
    by_round = {r: max(e for rr, e in spent if rr == r) for r in (1, 2)}
    assert 0 < by_round[1] < by_round[2]  # the second round adds to the first
    (run_1,) = set(STARTED.findall(log))
    assert sorted(p.name for p in (cache / "privacy").iterdir()) == ["runs"]
    ledgers = sorted((cache / "privacy" / "runs" / run_1).glob("sim-*.json"))
    assert len(ledgers) == 2
    history = json.loads(ledgers[0].read_text())["history"]
    assert history and history[0]["noise_multiplier"] == 1.0
    # no exact label histograms under DP: the catalog's sample counts stay 0
    catalog = SyncCatalog(db)
    assert all(c.sample_count == 0 for c in catalog.list_categories())
    nodes = catalog.list_nodes()  # the catalog records each node's spend
    assert len(nodes) == 2 and all((n.dp_epsilon or 0) > 0 for n in nodes)

    # a new run (resume) on the same devices: the budget already spent counts,
    # so with dp-epsilon at what round 1 cost, every device declines
    ledger = PrivacyLedger.load(cache, ledgers[0].stem, run_1)
    budget = ledger.epsilon(1e-5) * 1.01
    second = flwr_run(
        link,
        f"num-server-rounds=1 resume=true dp-epsilon={budget:.4f} {common}",
        nodes=2,
    )
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "DP budget: this round would bring epsilon to" in log2, log2[-3000:]
    assert "round 3/3: 0/2 nodes replied" in log2, log2[-3000:]
    assert PrivacyLedger.load(cache, ledgers[0].stem, run_1).history == ledger.history
    assert sorted(p.name for p in (cache / "privacy" / "runs").iterdir()) == [run_1]

    # a new simulation, new virtual devices: nothing spent, the same budget trains
    third = flwr_run(link, f"num-server-rounds=1 dp-epsilon={budget:.4f} {common}", 2)
    log3 = third.stdout + third.stderr
    assert third.returncode == 0, log3[-4000:]
    assert "DP budget" not in log3, log3[-3000:]
    assert "round 1/1: 2/2 nodes replied" in log3, log3[-3000:]
    (run_3,) = set(STARTED.findall(log3))
    fresh = PrivacyLedger.load(cache, ledgers[0].stem, run_3)
    assert 0 < fresh.epsilon(1e-5) < ledger.epsilon(1e-5)  # one round, not two
    assert PrivacyLedger.load(cache, ledgers[0].stem, run_1).history == ledger.history
