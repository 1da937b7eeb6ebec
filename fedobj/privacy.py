"""A device's differential-privacy budget, kept on its own disk across rounds and runs.

DP-SGD's guarantee is about everything a device ever released. Flower's
``context.state`` lasts one run and its node id is not stable across restarts, so
the spent budget lives in a small JSON ledger under the device's cache folder,
keyed by a stable device identity (node config ``device-id``). A fresh Opacus
``PrivacyEngine`` per round would start from zero and under-report; instead each
round's (noise multiplier, sample rate, steps) is appended here and the RDP
accountant is rebuilt from the whole history, so ``resume=true`` or a new run
never resets epsilon. The history is what a reply reports, so anyone can
recompute the epsilon independently.

A simulated device (a partition of a shared data set, ``sim-<N>``) is no device
that outlives its run: a new simulation is a new set of virtual devices, so their
ledgers are kept per run (``privacy/runs/<scope>/``), and ``resume=true``
continues those of the run it resumes. Without that, every DP simulation on a
machine spent the same ten virtual devices' budgets.

This module is the accountant's memory only (issue 5); DP-SGD itself runs in the
training loop.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedobj import keys
from fedobj.errors import ConfigError, FedObjError

ACCOUNTANT = "rdp"
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
LEDGER_SCOPE_RECORD = "fedobj-dp-ledger-scope"
"""Kept in a run row's config: the scope of its simulated devices' ledgers."""


class PrivacyLedgerError(FedObjError):
    """A device's privacy ledger is unreadable: refuse to train rather than reset."""


@dataclass(frozen=True)
class Spend:
    """One stretch of DP-SGD: Opacus' accountant history entry."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyLedger:
    """Every DP-SGD stretch a device ran, persisted as JSON at ``path``."""

    path: Path
    history: list[Spend] = field(default_factory=list)

    @classmethod
    def load(
        cls, directory: str | Path, device_id: str, scope: str | None = None
    ) -> PrivacyLedger:
        """The ledger of ``device_id`` (empty if the device never trained with DP).

        ``scope`` (:func:`device_ledger_scope`): None for a real device's own
        ledger, else the run whose virtual devices these are. Raises
        :class:`PrivacyLedgerError` for a file that exists but cannot be read:
        losing the history would silently reset the budget.
        """
        if not device_id.strip():
            raise PrivacyLedgerError("a device id is needed to keep a DP budget")
        name = _SAFE_ID.sub("_", device_id.strip())
        folder = Path(directory) / "privacy"
        if scope is not None:
            if not scope.strip():
                raise PrivacyLedgerError("an empty ledger scope")
            folder = folder / "runs" / _SAFE_ID.sub("_", scope.strip())
        path = folder / f"{name}.json"
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("accountant") != ACCOUNTANT:
                raise ValueError(f"accountant {raw.get('accountant')!r}")
            history = [
                Spend(
                    float(h["noise_multiplier"]),
                    float(h["sample_rate"]),
                    int(h["steps"]),
                )
                for h in raw["history"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyLedgerError(
                f"privacy ledger {path} is unreadable ({exc}); refusing to train "
                "with a reset budget: restore the file or retire the device id"
            ) from exc
        return cls(path, history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any DP training)."""
        return _epsilon(self.history, delta)

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """Epsilon the device would have spent after one more stretch."""
        more = [*self.history, Spend(noise_multiplier, sample_rate, steps)]
        return _epsilon(more, delta)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append a stretch (merged with the last one if it used the same noise
        and sample rate) and write the ledger atomically."""
        if steps <= 0:
            return
        last = self.history[-1] if self.history else None
        if (
            last is not None
            and last.noise_multiplier == noise_multiplier
            and last.sample_rate == sample_rate
        ):
            self.history[-1] = Spend(noise_multiplier, sample_rate, last.steps + steps)
        else:
            self.history.append(Spend(noise_multiplier, sample_rate, steps))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "accountant": ACCOUNTANT,
                    "history": [h.__dict__ for h in self.history],
                },
                indent=1,
            )
        )
        os.replace(tmp, self.path)


def device_id(node_config: Mapping[str, Any]) -> str | None:
    """A stable identity for the device's DP ledger.

    ``device-id`` from the node config; in simulation the partition id (the
    same virtual device in every run, whose ledger is kept per run:
    ``fedobj.privacy.device_ledger_scope``). Flower's node id changes on
    restart, so it never keys a privacy budget (nor the edge link's residual
    and held model: ``fedobj.compression.device_state``).
    """
    if node_config.get(keys.NODE_DEVICE_ID):
        return str(node_config[keys.NODE_DEVICE_ID])
    if keys.NODE_PARTITION_ID in node_config:
        return f"sim-{int(node_config[keys.NODE_PARTITION_ID])}"
    return None


def device_ledger_scope(
    node_config: Mapping[str, Any], sent: object, run_id: int
) -> str | None:
    """Which ledgers a device spends: None for a device of its own (node config
    ``device-id``: one ledger for every run, wherever it is), else, for a
    simulated one (``partition-id``), the scope the server ``sent``
    (``keys.DP_LEDGER_SCOPE``, :func:`run_ledger_scope`), or this run's id."""
    if node_config.get(keys.NODE_DEVICE_ID):
        return None
    if keys.NODE_PARTITION_ID not in node_config:
        return None  # no identity at all: the device declines DP
    return str(sent) if sent else str(run_id)


class _Runs(Protocol):
    def get_run(self, run_id: str) -> Any: ...


def run_ledger_scope(runs: _Runs, run_id: str, resumed_run: str | None) -> str:
    """The scope a run's simulated devices spend: its own (``run_id``: new
    devices, unspent budgets), or, resuming ``resumed_run``, the one that run
    recorded in its row (:data:`LEDGER_SCOPE_RECORD`; it may have resumed an
    earlier run), else that run's id. ``runs`` is the catalog."""
    if resumed_run is None:
        return run_id
    try:
        recorded = runs.get_run(resumed_run).config
    except LookupError:  # the catalog's NotFoundError: no row, its own id
        return resumed_run
    return str(recorded.get(LEDGER_SCOPE_RECORD) or resumed_run)


def _epsilon(history: list[Spend], delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"dp-delta must be in (0, 1), got {delta}")
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    return float(accountant.get_epsilon(delta))


def check_dp_compatible(
    model: Any,
    grad_sample_mode: str = "ghost",
    example_shape: tuple[int, ...] = (1, 28, 28),
) -> None:
    """Refuse, before round 1, a model Opacus cannot train with DP-SGD.

    BatchNorm mixes samples within a batch, so per-sample gradients (and the
    guarantee) do not exist for it; Opacus' validator names every such layer.
    Book-keeping clipping (``"bk"``) also needs a per-sample gradient function
    for every trainable layer (those without one are named) and no layer output
    changed in place: one step on two zero inputs of ``example_shape`` shows it.
    """
    from opacus.validators import ModuleValidator

    from fedobj.train import batch_mixing_layers

    problems: list[Any] = list(ModuleValidator.validate(model, strict=False))
    problems += [f"{m} mixes a batch's samples" for m in batch_mixing_layers(model)]
    if problems:
        names = "; ".join(str(p) for p in problems[:5])
        raise ConfigError(
            f"run config `dp`=true needs a DP-compatible model: {names} "
            '(use norm="group")'
        )
    if grad_sample_mode == "bk":
        import torch

        from fedobj.bookkeeping import check_clippable

        try:
            check_clippable(model, torch.zeros(2, *example_shape))
        except ValueError as exc:
            raise ConfigError(
                f'dp-grad-sample-mode="bk" cannot clip this model: {exc}; use "ghost"'
            ) from exc
