"""The device's DP ledger: survives reloads (new rounds, new runs), matches Opacus'
own accountant, never silently resets; a simulated device's lasts its run (and
the runs that resume it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedobj import keys
from fedobj.catalog import SyncCatalog
from fedobj.privacy import (
    LEDGER_SCOPE_RECORD,
    PrivacyLedger,
    PrivacyLedgerError,
    device_ledger_scope,
    run_ledger_scope,
)


def test_spent_budget_survives_reload_and_matches_opacus(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(tmp_path, "board-7")
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(1.1, 0.02, 170)
    ledger.record(1.1, 0.02, 170)  # same noise and rate: merged
    ledger.record(1.3, 0.01, 90)
    again = PrivacyLedger.load(tmp_path, "board-7")  # next round / next run
    assert [(h.noise_multiplier, h.sample_rate, h.steps) for h in again.history] == [
        (1.1, 0.02, 340),
        (1.3, 0.01, 90),
    ]
    reference = RDPAccountant()
    for _ in range(340):
        reference.step(noise_multiplier=1.1, sample_rate=0.02)
    for _ in range(90):
        reference.step(noise_multiplier=1.3, sample_rate=0.01)
    assert again.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_after_predicts_the_next_stretch(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(tmp_path, "phone/1")
    ledger.record(1.0, 0.05, 100)
    now = ledger.epsilon(1e-5)
    after = ledger.epsilon_after(1.0, 0.05, 100, 1e-5)
    assert after > now > 0
    ledger.record(1.0, 0.05, 100)
    assert ledger.epsilon(1e-5) == pytest.approx(after)
    assert (tmp_path / "privacy" / "phone_1.json").exists()  # id made file-safe


def test_unreadable_ledger_refuses_instead_of_resetting(tmp_path: Path) -> None:
    path = tmp_path / "privacy" / "d.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(PrivacyLedgerError, match="refusing to train"):
        PrivacyLedger.load(tmp_path, "d")
    with pytest.raises(PrivacyLedgerError, match="device id"):
        PrivacyLedger.load(tmp_path, "  ")
    with pytest.raises(ValueError, match="dp-delta"):
        PrivacyLedger.load(tmp_path, "e").epsilon(0.0)


def test_simulated_devices_spend_their_runs_ledgers_real_ones_their_own(
    tmp_path: Path,
) -> None:
    sim = {keys.NODE_PARTITION_ID: 3, keys.NODE_NUM_PARTITIONS: 10}
    assert device_ledger_scope(sim, None, 12) == "12"  # a new run: new devices
    assert device_ledger_scope(sim, "", 12) == "12"
    assert device_ledger_scope(sim, "11", 12) == "11"  # what the server names
    for real in ({keys.NODE_DEVICE_ID: "cam-7"}, {keys.NODE_DEVICE_ID: "c", **sim}):
        assert device_ledger_scope(real, "11", 12) is None  # its own, every run
    assert device_ledger_scope({}, "11", 12) is None  # no identity: it declines

    spent = PrivacyLedger.load(tmp_path, "sim-3", "11")
    spent.record(1.0, 0.05, 100)
    assert PrivacyLedger.load(tmp_path, "sim-3", "11").history == spent.history
    assert PrivacyLedger.load(tmp_path, "sim-3", "12").history == []
    assert PrivacyLedger.load(tmp_path, "sim-3").history == []
    assert spent.path == tmp_path / "privacy" / "runs" / "11" / "sim-3.json"
    # a real device's ledger stays where it always was
    assert PrivacyLedger.load(tmp_path, "cam-7").path == (
        tmp_path / "privacy" / "cam-7.json"
    )
    assert PrivacyLedger.load(tmp_path, "sim-3", "../x").path.parent.name == ".._x"
    with pytest.raises(PrivacyLedgerError, match="scope"):
        PrivacyLedger.load(tmp_path, "sim-3", " ")


def test_a_resumed_run_continues_the_ledgers_of_the_run_it_resumes(
    tmp_path: Path,
) -> None:
    catalog = SyncCatalog(tmp_path / "c.db")
    catalog.migrate()
    for run_id, config in (("1", {}), ("2", {LEDGER_SCOPE_RECORD: "1"})):
        catalog.begin_run(
            run_id,
            strategy="fedavg",
            model="cnn",
            first_round=1,
            last_round=2,
            config=config,
        )
    assert run_ledger_scope(catalog, "5", None) == "5"  # not resumed: its own
    assert run_ledger_scope(catalog, "5", "2") == "1"  # 2 had resumed 1
    assert run_ledger_scope(catalog, "5", "1") == "1"  # a row that recorded none
    assert run_ledger_scope(catalog, "5", "gone") == "gone"  # no row at all


def test_dp_sgd_trains_and_its_plan_is_what_the_ledger_records(
    tmp_path: Path,
) -> None:
    import numpy as np
    import torch

    from fedobj.data.fashion_mnist import load_fashion_mnist
    from fedobj.model import ModelArgs, build_model
    from fedobj.train import (
        DpSettings,
        LabelledTensors,
        TrainConfig,
        dp_plan,
        train_private,
    )

    torch.manual_seed(0)
    d = load_fashion_mnist("train")
    data = LabelledTensors(
        torch.from_numpy(d.images[:600].copy()),
        torch.from_numpy(d.labels[:600].astype(np.int64)),
    )
    model = build_model(ModelArgs())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=0.05, batch_size=32)
    run = train_private(model, data, cfg, DpSettings(1.0, 1.0), active=list(range(10)))
    # what Opacus runs: ceil(600 / 32) = 19 Poisson batches at rate 1/19
    assert (run.sample_rate, run.steps) == dp_plan(600, cfg) == (1 / 19, 19)
    assert run.result.num_examples > 0 and np.isfinite(run.result.loss)
    after = model.state_dict()
    assert list(after) == list(before)  # Opacus trained the same module in place
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ledger = PrivacyLedger.load(tmp_path, "d")
    ledger.record(1.0, run.sample_rate, run.steps)
    assert 0 < ledger.epsilon(1e-5) < 10


def test_batchnorm_models_and_fedprox_are_refused_with_dp() -> None:
    from fedobj.config import RunConfig
    from fedobj.errors import ConfigError
    from fedobj.model import ModelArgs, build_model
    from fedobj.privacy import check_dp_compatible

    check_dp_compatible(build_model(ModelArgs(norm="group")))  # fine
    with pytest.raises(ConfigError, match="DP-compatible.*group"):
        check_dp_compatible(build_model(ModelArgs(norm="batch")))
    with pytest.raises(ConfigError, match="fedprox"):
        RunConfig.from_flower({"dp": True, "strategy": "fedprox"})


@pytest.mark.parametrize("batch", [1, 7, 32, 64, 100])
def test_the_dp_plan_is_what_opacus_samples_for_every_size(batch: int) -> None:
    """The ledger records dp_plan's rate and steps: they must be Opacus' own for
    any number of examples, never an approximation that could under-count."""
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from fedobj.train import TrainConfig, dp_plan

    for n in [1, 2, 31, 32, 33, 63, 64, 65, 599, 600, 601, 2000, 5999, 6000]:
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
        dp = DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch))
        cfg = TrainConfig(epochs=2, batch_size=batch)
        assert dp_plan(n, cfg) == (dp.sample_rate, 2 * len(dp)), (n, batch)
