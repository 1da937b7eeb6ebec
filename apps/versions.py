"""A run's versions: register each round's, decide which is current, follow rollbacks.

Contract 6: every round leaves a version (checkpoint, metrics, class map, parent,
provenance, the server optimizer's state), exactly one version is current, and a
rollback makes an older one current that the next round continues from. An
admin may move the current version at any time, also while a round trains, so
:class:`VersionKeeper` keeps what this run believes is current and compares it
with the catalog when a round starts and when a version is registered: the
admin's choice always wins.

It needs no Flower type: the model comes as a state dict, and the server
optimizer (the inner Flower strategy) is only read and written through its
``m_t``/``v_t`` moments.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch

from apps.central_dp import PROVENANCE_KEY
from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import VersionRecord
from fedobj.classmap import ClassMap
from fedobj.model.checkpoint import Checkpoint
from fedobj.model.factory import ModelArgs
from fedobj.registry import ArtifactStore

# the round's lines, wherever the step that writes them lives
log = logging.getLogger("fedobj.strategy")

MOMENTS = ("m_t", "v_t")
"""FedAdam's (and FedOpt's) server moments, kept with every version for resume."""


def server_state(optimizer: Any) -> bytes | None:
    """The server optimizer's moments as ``.npz`` bytes; None if it has none."""
    state = {
        f"{name}/{k}": v
        for name in MOMENTS
        for k, v in (getattr(optimizer, name, None) or {}).items()
    }
    if not state:
        return None
    buf = io.BytesIO()
    np.savez(buf, **state)  # type: ignore[arg-type]
    return buf.getvalue()


class VersionKeeper:
    """Registers a run's versions and keeps its idea of the current one.

    Parameters
    ----------
    catalog, store
        Where versions are registered, and where checkpoints and server state go.
    run_id
        Names the run's artifacts (``RUN/round-NNN.pt``) and versions.
    promote
        ``"latest"``: every round's version becomes current; ``"best"``: only one
        with the best centralised accuracy among versions of the same class map
        (a growth always makes its first version current).
    provenance
        Written into every version (run config, seed, code revision, packages).
    """

    def __init__(
        self,
        catalog: SyncCatalog,
        store: ArtifactStore,
        run_id: str,
        promote: str = "latest",
        provenance: dict[str, Any] | None = None,
    ) -> None:
        if promote not in ("latest", "best"):
            raise ValueError(f"promote must be 'latest' or 'best', got {promote!r}")
        self.catalog = catalog
        self.store = store
        self.run_id = run_id
        self.promote = promote
        self.provenance = dict(provenance or {})
        # the version the last finished round registered (parent of the next one
        # unless a rollback intervenes), and the version this run believes is
        # current (a difference is an admin's move)
        self.last_version_id: Any = None
        self.expected_current: Any = None

    def begin(self, parent_version: Any = None) -> None:
        """A run (or its resumption) starts from ``parent_version``, if any."""
        self.last_version_id = parent_version
        if parent_version is not None:  # continuing from it: follow a different current
            self.expected_current = parent_version
        else:  # a fresh model does not "roll back" to what an older run left current
            current = self.catalog.current_version()
            self.expected_current = current.id if current is not None else None

    def follow_rollback(
        self, optimizer: Any = None
    ) -> tuple[VersionRecord, Checkpoint] | None:
        """If an admin made another version current, the version and its checkpoint
        to continue from (``optimizer``'s moments restored from it); else None."""
        current = self.catalog.current_version()
        if current is None or current.id == self.expected_current:
            return None
        self.expected_current = current.id
        ckpt = self.store.load_checkpoint(
            current.checkpoint_uri, current.checkpoint_sha256
        )
        self.restore_server_state(optimizer, current)
        log.info(
            "rollback honoured: continuing from version %s (run %s, round %d)",
            current.name,
            current.run_id,
            current.round,
        )
        return current, ckpt

    def restore_server_state(self, optimizer: Any, version: VersionRecord) -> None:
        """Give ``optimizer`` the moments ``version`` was saved with (or none)."""
        for name in MOMENTS:
            if hasattr(optimizer, name):
                setattr(optimizer, name, None)
        if not version.server_state_uri or not hasattr(optimizer, "m_t"):
            return
        sha = str(version.provenance.get("server_state_sha256", ""))
        data = self.store.read_verified(version.server_state_uri, sha)
        with np.load(io.BytesIO(data)) as npz:
            for name in MOMENTS:
                setattr(
                    optimizer,
                    name,
                    {
                        k.split("/", 1)[1]: npz[k]
                        for k in npz.files
                        if k.startswith(name + "/")
                    },
                )

    def register(
        self,
        server_round: int,
        state_dict: dict[str, torch.Tensor],
        *,
        metrics: dict[str, float],
        class_map: ClassMap,
        model_args: ModelArgs,
        grew: bool = False,
        privacy: dict[str, Any] | None = None,
        server_state: bytes | None = None,
        parent: Any = None,
    ) -> VersionRecord:
        """Store the round's checkpoint and register its version.

        ``metrics`` are the centralised ones (the checkpoint's); the version
        adds central DP's epsilon when ``privacy`` (the spend so far) is given,
        and records the ledger so that the next run continues it.

        Parent: the version the round started from (``parent`` after a rollback,
        else the one the previous round registered). Current: yes, unless an admin
        moved the current version since this run last set it (their choice wins;
        the next round starts from it), or ``promote="best"`` finds a better one
        (a round that ``grew`` the head is always made current).
        """
        key = f"{self.run_id}/round-{server_round:03d}"
        metrics = dict(metrics)
        ckpt = Checkpoint(
            model_args,
            class_map,
            state_dict,
            round=server_round,
            metrics=metrics,
            extra={"run_id": self.run_id},
        )
        art = self.store.save_checkpoint(f"{key}.pt", ckpt)
        provenance = dict(self.provenance)
        if privacy is not None:  # the next run continues this ledger
            provenance[PROVENANCE_KEY] = privacy
            metrics["central-dp-epsilon"] = float(privacy["epsilon"])
        state_uri = None
        if server_state is not None:
            state_art = self.store.put_bytes(
                f"{key}.server.npz", server_state, what="server state"
            )
            state_uri = state_art.uri
            provenance["server_state_sha256"] = state_art.sha256
        version = self.catalog.register_version(
            run_id=self.run_id,
            round=server_round,
            class_map=class_map,
            metrics=metrics,
            checkpoint_uri=art.uri,
            checkpoint_sha256=art.sha256,
            size_bytes=art.size,
            provenance=provenance,
            parent=parent if parent is not None else self.last_version_id,
            make_current=self._becomes_current(server_round, grew, metrics, class_map),
            server_state_uri=state_uri,
        )
        self.last_version_id = version.id  # our model is this version now
        if version.is_current:
            self.expected_current = version.id
        return version

    def _becomes_current(
        self,
        server_round: int,
        grew: bool,
        metrics: dict[str, float],
        class_map: ClassMap,
    ) -> bool:
        """Whether the round's version is made current (see :meth:`register`)."""
        current = self.catalog.current_version()
        if current is not None and current.id != self.expected_current:
            # an admin rolled back while this round ran: their choice wins, and the
            # next round continues from it (this round's version is kept, not current)
            log.info(
                "round %d: current version moved to %s during the round; "
                "this round's version is registered but not made current",
                server_round,
                current.name,
            )
            return False
        if self.promote == "best" and not grew:
            best = self.catalog.best_version(class_map)
            acc = metrics.get("accuracy")
            return (
                best is None
                or best.accuracy is None
                or (acc is not None and acc >= best.accuracy)
            )
        return True
