"""Central differential privacy: Flower's DP wrappers around the inner strategy.

Flower 1.41 ships four Message-API wrappers (server- or client-side clipping, fixed
or adaptive bound) that clip each node's update, average and add Gaussian noise
of ``noise_multiplier * clipping_norm / sampled_nodes`` to the mean. Two facts
shape how fedobj uses them (DESIGN.md, "The round"):

- they snapshot the arrays in ``configure_train``, so CatalogStrategy grows the
  head *before* it calls them, and they skip a whole round on any error reply,
  so declined and invalid replies are removed before they see them;
- their noise scale assumes an equal-weight mean, and Flower's RDP accountant
  (fixed clipping only) refuses anything but FedAvg's own aggregation with equal
  weights. With central DP on, every train reply therefore carries
  ``unit-weight = 1`` (added by :func:`central_dp_mod` on the node) and the inner
  strategy averages by it, not by example counts; replies are aggregated
  together, not streamed (the wrappers clip each reply before the mean).

The accountant's ledger is kept in every version's provenance and reloaded by
the next run, so a resumed or new run continues the spend instead of resetting it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedobj import keys
from fedobj.config import RunConfig
from fedobj.errors import ConfigError

if TYPE_CHECKING:  # the node side never needs the catalog
    from fedobj.catalog import SyncCatalog

log = logging.getLogger("fedobj.central_dp")

PROVENANCE_KEY = "central_dp"
"""Where a version's provenance keeps the central-DP spend and the ledger."""


class _UnclippedQuantile:
    """Andrew et al.'s bound update, the right way round.

    Flower 1.41's adaptive wrappers count the *clipped* updates and then apply
    the paper's ``C *= exp(-lr * (fraction - target))``, which the paper writes
    for the *unclipped* fraction: when every update is clipped the bound shrinks
    further instead of growing (measured: 0.1 -> 0.061 in five rounds of
    updates 30x above it). Feeding the unclipped fraction restores the paper's
    rule: ``central-dp-target-quantile`` is the share of updates left unclipped.
    """

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)  # type: ignore[misc]


class ServerSideAdaptiveClipping(
    _UnclippedQuantile, DifferentialPrivacyServerSideAdaptiveClipping
):
    """Flower's server-side adaptive clipping with the bound update corrected."""


class ClientSideAdaptiveClipping(
    _UnclippedQuantile, DifferentialPrivacyClientSideAdaptiveClipping
):
    """Flower's client-side adaptive clipping with the bound update corrected."""


def sample_size(num_nodes: int, cfg: RunConfig) -> int:
    """Nodes FedAvg samples per round (its own formula): the wrappers' ``m``."""
    return max(int(num_nodes * cfg.training.fraction_train), cfg.training.min_nodes)


def wrap_central_dp(
    base: FedAvg,
    cfg: RunConfig,
    num_nodes: int,
    ledger: dict[str, Any] | None = None,
) -> Strategy:
    """``base`` inside the Flower wrapper that ``central-dp`` names.

    ``num_nodes`` is the population connected before round 1; ``ledger`` the
    accountant state an earlier run left (:func:`latest_ledger`), continued here.
    """
    p = cfg.privacy
    if base.weighted_by_key != keys.UNIT_WEIGHT:
        raise ConfigError(
            "central DP needs an equal-weight mean: build the inner strategy with "
            f"weighted_by_key={keys.UNIT_WEIGHT!r}"
        )
    m = sample_size(num_nodes, cfg)
    if m > num_nodes:
        raise ConfigError(
            f"central DP samples {m} nodes per round but only {num_nodes} are "
            "connected (raise num-supernodes or lower min-nodes)"
        )
    noise, clip = p.central_dp_noise_multiplier, p.central_dp_clipping_norm
    if p.central_dp.endswith("-adaptive"):
        adaptive = {
            "initial_clipping_norm": clip,
            "target_clipped_quantile": p.central_dp_target_quantile,
            "clip_norm_lr": p.central_dp_clip_lr,
        }
        kind: (
            type[DifferentialPrivacyServerSideAdaptiveClipping]
            | type[DifferentialPrivacyClientSideAdaptiveClipping]
        ) = (
            ServerSideAdaptiveClipping
            if p.central_dp == "server-adaptive"
            else ClientSideAdaptiveClipping
        )
        try:
            return kind(base, noise, m, **adaptive)
        except ValueError as exc:
            # Andrew et al.: part of the noise goes to the clipped-count estimate,
            # whose std defaults to m/20; the split needs noise < m/10
            raise ConfigError(
                f"central-dp={p.central_dp} with {m} nodes sampled per round needs "
                f"central-dp-noise-multiplier < {m / 10:g} (Flower: {exc})"
            ) from None
    accountant = make_accountant(cfg, num_nodes, ledger)
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if p.central_dp == "server-fixed"
        else DifferentialPrivacyClientSideFixedClipping
    )
    try:
        return wrapper(base, noise, clip, m, accountant=accountant)
    except ValueError as exc:  # Flower's own checks, said in run-config terms
        raise ConfigError(f"central-dp={p.central_dp}: {exc}") from None


def make_accountant(
    cfg: RunConfig, num_nodes: int, ledger: dict[str, Any] | None
) -> RdpAccountant | None:
    """Flower's RDP accountant when ``central-dp-epsilon`` > 0, else None.

    No amplification by sampling is claimed (Flower's fixed-clipping accounting
    supports only that), so each round costs the same whoever is sampled. An
    earlier ledger is replayed: its releases happened, whatever this run's
    delta or budget; its population is kept (the events were sized by it).
    """
    p = cfg.privacy
    if p.central_dp_epsilon <= 0:
        return None
    population = num_nodes
    if ledger is not None:
        population = int(ledger["config"]["population_size"])  # type: ignore[index]
    config = PrivacyConfig(
        target_delta=p.central_dp_delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=p.central_dp_epsilon,
    )
    accountant = RdpAccountant(config)
    if ledger is not None:
        state = dict(ledger)
        state["config"] = {
            **dict(ledger["config"]),  # type: ignore[arg-type]
            "target_delta": p.central_dp_delta,
            "max_epsilon": p.central_dp_epsilon,
        }
        try:
            accountant.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"the central-DP ledger of an earlier run cannot be continued: {exc}"
            ) from None
    return accountant


def spend(strategy: Strategy) -> dict[str, Any] | None:
    """The accountant's spend so far and its ledger, for a version's provenance."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is None:
        return None
    spent = accountant.get_privacy_spent()
    return {
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": spent.num_releases,
        "accountant": spent.accounting_method,
        "noise_multiplier": strategy.noise_multiplier,  # type: ignore[attr-defined]
        "clipping_norm": strategy.clipping_norm,  # type: ignore[attr-defined]
        "sampled_nodes": strategy.num_sampled_clients,  # type: ignore[attr-defined]
        "ledger": accountant.state_dict(),
    }


def latest_ledger(catalog: SyncCatalog, page: int = 100) -> dict[str, Any] | None:
    """The newest central-DP ledger any version recorded (rollbacks do not undo
    a release: the newest version has seen every one)."""
    offset = 0
    while True:
        versions = catalog.list_versions(limit=page, offset=offset)
        for v in versions:  # newest first
            entry = v.provenance.get(PROVENANCE_KEY)
            if isinstance(entry, dict) and "ledger" in entry:
                return dict(entry["ledger"])
        if len(versions) < page:
            return None
        offset += page


def central_dp_mod(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Node side of central DP: equal weight, and clipping where the mode says.

    Train messages that carry ``central-dp`` get ``unit-weight = 1`` in their
    reply's metrics; for the client-side modes Flower's ``fixedclipping_mod`` or
    ``adaptiveclipping_mod`` then clips the update to the bound the server sent.
    Every other message passes through untouched, so one ClientApp serves runs
    with and without central DP.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    config = msg.content.config_records.get(keys.CONFIG)
    mode = str(config.get(keys.CENTRAL_DP, "")) if config is not None else ""
    if not mode or mode == "none":
        return call_next(msg, ctxt)

    def weighted(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error():
            metrics = reply.content.metric_records.get(keys.METRICS)
            if metrics is not None:
                metrics[keys.UNIT_WEIGHT] = 1.0
        return reply

    if mode == "client-fixed":
        return fixedclipping_mod(msg, ctxt, weighted)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, ctxt, weighted)
    return weighted(msg, ctxt)
