"""Pruning old model versions: free their artifacts, keep their rows.

A pruned version keeps its catalog row (lineage, metrics, class map stay
queryable) but loses its checkpoint, server state and exports. Never pruned: the
current version, the newest ``keep`` versions, and the parent of any version kept
(the lineage a rollback would walk back along).
"""

from __future__ import annotations

from fedobj.catalog import SyncCatalog
from fedobj.catalog.records import VersionRecord
from fedobj.registry import ArtifactStore


def prune_versions(
    catalog: SyncCatalog, store: ArtifactStore, keep: int, dry_run: bool = False
) -> list[VersionRecord]:
    """Prune all but the newest ``keep`` versions; return those pruned (or to be)."""
    if keep < 1:
        raise ValueError(f"--keep must be >= 1, got {keep}")
    versions = sorted(
        catalog.list_versions(limit=1_000_000), key=lambda v: v.number, reverse=True
    )
    kept = {v.id for v in versions[:keep]} | {v.id for v in versions if v.is_current}
    kept |= {v.parent_id for v in versions if v.id in kept and v.parent_id}
    doomed = [v for v in versions if v.id not in kept and not v.pruned]
    if dry_run:
        return doomed
    for v in doomed:
        catalog.mark_pruned(v.id)  # the row first: a pruned row never points at data
        exported = [str(a["uri"]) for a in v.artifacts.values() if a.get("uri")]
        # the "server" entry points at one of the exports: delete each file once
        for uri in dict.fromkeys(
            [v.checkpoint_uri, v.server_state_uri, v.onnx_uri, *exported]
        ):
            if uri and store.exists(uri):
                store.delete(uri)
    return doomed
