"""The device's DP ledger: survives reloads (new rounds, new runs), matches Opacus'
own accountant, never silently resets."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedobj.privacy import PrivacyLedger, PrivacyLedgerError


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
