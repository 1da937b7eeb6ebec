"""The ServerApp: federated training of a fedobj model on Flower's Message API.

Per round it leaves a checkpoint, a metrics row per round and per node, and one log
line a person can follow; at the end a summary and a PNG. All paths are resolved to
absolute ones and logged once, because this process does not run in the user's shell.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from apps.central_dp import latest_ledger
from apps.central_eval import central_evaluator
from apps.exchange import DOWNLINK_BYTES, UPLINK_BYTES
from apps.link import Link
from apps.records import model_to_arrays
from apps.run_lease import held_lease
from apps.secagg import catalog_strategy_class
from apps.strategy import RoundReport, make_inner_strategy
from fedobj import keys
from fedobj.calibration import CalibrationSettings
from fedobj.catalog import NotFoundError, RunRecord, SyncCatalog, VersionRecord
from fedobj.config import RunConfig
from fedobj.data.categories import FASHION_MNIST_NAMES
from fedobj.errors import ConfigError, FedObjError
from fedobj.model.checkpoint import FORMAT_VERSION
from fedobj.model.factory import ModelArgs, build_model
from fedobj.outputs import (
    RunOutputs,
    code_revision,
    package_versions,
    write_json_atomic,
)
from fedobj.privacy import LEDGER_SCOPE_RECORD, check_dp_compatible, run_ledger_scope
from fedobj.registry import ArtifactStore

log = logging.getLogger("fedobj.server")
app = ServerApp()


def _setup_logging() -> None:
    """fedobj's own lines go to stderr, which Flower streams with ``--stream``."""
    logger = logging.getLogger("fedobj")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedobj: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def wait_for_nodes(
    grid: Grid, minimum: int, settle_s: float = 2.0, max_wait_s: float = 60.0
) -> int:
    """Wait until at least ``minimum`` nodes are connected and the count is stable.

    Flower samples from the nodes connected *now*; right after start-up not all
    simulated nodes are registered, and round 1 would train on a subset. Fewer
    than ``minimum`` after ``max_wait_s`` is an error before round 1 (Flower's own
    sampling would wait for them forever).
    """
    deadline = time.monotonic() + max_wait_s
    count, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
        elif count >= minimum and time.monotonic() - stable_since >= settle_s:
            break
        time.sleep(0.25)
    if count < minimum:
        raise ConfigError(
            f"only {count} nodes connected after {max_wait_s:.0f} s; the run needs "
            f"`min-nodes`={minimum} (in simulation: is the federation's "
            "num-supernodes smaller than min-nodes?)"
        )
    return count


def _count(value: float | None) -> int | None:
    return int(value) if value is not None else None


def _per_node(results: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in results if key in r]
    return sum(values) / len(values) if values else None


def _mean(results: list[dict[str, float]], key: str) -> float | None:
    pairs = [(r[key], r.get(keys.NUM_EXAMPLES, 0.0)) for r in results if key in r]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    try:
        run(grid, context)
    except FedObjError as exc:  # says what went wrong in its own words
        log.error("%s", exc)
        raise
    except Exception as exc:  # one line a launcher can show (fedobj.launch)
        log.error("%s: %s", type(exc).__name__, exc)
        raise


def open_catalog(cfg: RunConfig, outputs_root: Path) -> SyncCatalog:
    """The run's catalog, migrated, seeded on first use with Fashion-MNIST names."""
    catalog = SyncCatalog(
        cfg.deployment.database_url or None, default_path=outputs_root / "catalog.db"
    )
    catalog.migrate()
    seeded = cfg.growth.initial_categories
    if seeded and catalog.snapshot().num_classes == 0:
        catalog.seed_categories(FASHION_MNIST_NAMES[:seeded])
    return catalog


def run(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    run_id = str(context.run_id)
    torch.manual_seed(cfg.training.seed)
    outputs_root = cfg.resolve_outputs_dir()
    outputs_root.mkdir(parents=True, exist_ok=True)
    catalog = open_catalog(cfg, outputs_root)
    store = ArtifactStore(cfg.resolve_registry_uri(outputs_root))
    dep = cfg.deployment
    with held_lease(catalog, run_id, dep.lease_ttl, force=dep.allow_concurrent_runs):
        try:
            _run_with_catalog(grid, cfg, run_id, outputs_root, catalog, store)
        except FedObjError as exc:  # its message says it (a full disk: path, space)
            _end_run(catalog, run_id, "failed", str(exc))
            raise
        except BaseException as exc:  # a kill by flwr stop is a failure too
            _end_run(catalog, run_id, "failed", f"{type(exc).__name__}: {exc}")
            raise
        _end_run(catalog, run_id, "completed")


LR_PHASE_START = "fedobj-lr-phase-start"
"""Kept in a run row's config: the round its learning-rate schedule counts from."""


def interrupted_plan(
    catalog: SyncCatalog, current: VersionRecord, cfg: RunConfig
) -> RunRecord | None:
    """The run ``resume=true`` should finish, or None to extend by N rounds.

    A run that did not complete (failed, killed, lost its lease) before its last
    round, resumed with the same ``num-server-rounds`` it was started with, is
    continued: its remaining rounds, its learning-rate schedule, so a seeded
    simulation ends in the weights the uninterrupted run would have. A finished
    run, or a different ``num-server-rounds``, means "this many more rounds".
    """
    try:
        run = catalog.get_run(current.run_id)
    except NotFoundError:
        return None
    asked = run.config.get("num-server-rounds")
    if (
        run.status == "completed"
        or current.round >= run.last_round
        or asked != cfg.training.num_server_rounds
    ):
        return None
    return run


def _end_run(
    catalog: SyncCatalog, run_id: str, status: str, error: str | None = None
) -> None:
    """Mark the run's row ended; a database that is gone must not hide the
    run's own error, so a failure here is logged, not raised."""
    try:
        catalog.end_run(run_id, status, error)
    except FedObjError as exc:
        log.error("run %s: could not record its end (%s): %s", run_id, status, exc)


def _run_with_catalog(
    grid: Grid,
    cfg: RunConfig,
    run_id: str,
    outputs_root: Path,
    catalog: SyncCatalog,
    store: ArtifactStore,
) -> None:
    first_round, parent = 1, None
    num_rounds, lr_start = cfg.training.num_server_rounds, None
    dep, growth = cfg.deployment, cfg.growth
    current = catalog.current_version() if dep.resume else None
    if current is not None:
        ckpt = store.load_checkpoint(current.checkpoint_uri, current.checkpoint_sha256)
        args, class_map = ckpt.model_args, ckpt.class_map
        initial = ArrayRecord(ckpt.state_dict)
        first_round, parent = current.round + 1, current.id
        plan = interrupted_plan(catalog, current, cfg)
        if plan is not None:  # finish what the interrupted run was asked to do
            num_rounds = plan.last_round - current.round
            lr_start = int(plan.config.get(LR_PHASE_START, plan.first_round))
            log.info(
                "continuing interrupted run %s from version %s: rounds %d..%d "
                "(its learning-rate schedule from round %d)",
                plan.run_id,
                current.name,
                first_round,
                plan.last_round,
                lr_start,
            )
        else:
            log.info(
                "resuming from version %s (run %s, round %d): %d more rounds",
                current.name,
                current.run_id,
                current.round,
                num_rounds,
            )
    else:
        class_map = catalog.snapshot()
        m = cfg.model
        args = ModelArgs(
            m.model, max(class_map.num_classes, 1), m.in_channels, m.image_size, m.norm
        )
        initial = model_to_arrays(build_model(args, m.pretrained_path or None))
    # simulated devices' DP ledgers: this run's, or those of the run it resumes
    scope = run_ledger_scope(catalog, run_id, current.run_id if current else None)
    if cfg.privacy.dp:  # before round 1: a BatchNorm model cannot train privately
        check_dp_compatible(
            build_model(args),
            cfg.privacy.dp_grad_sample_mode,
            (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size),
        )
    central = central_evaluator(cfg, args, class_map)

    outputs = RunOutputs.create(outputs_root, run_id)
    log.info(
        "run %s: outputs in %s; catalog %s; registry %s",
        run_id,
        outputs.root,
        catalog.url,
        store.public_root,
    )
    provenance = {
        "run_config": cfg.to_flower(),
        "seed": cfg.training.seed,
        "code_revision": code_revision(),
        "packages": package_versions(),
        "checkpoint_format": FORMAT_VERSION,
    }
    outputs.write_run_info(
        {
            **provenance,
            "run_id": run_id,
            "model_args": args.to_dict(),
            "class_map": class_map.to_dict(),
            "outputs_dir": str(outputs.root),
            "catalog": catalog.url,
            "first_round": first_round,
            "started": time.time(),
        }
    )

    catalog.begin_run(
        run_id,
        strategy=cfg.training.strategy,
        model=cfg.model.model,
        first_round=first_round,
        last_round=first_round + num_rounds - 1,
        # a continued run keeps counting its schedule from the original start, so
        # a second crash and resume continues it the same way
        config={
            **cfg.to_flower(),
            LR_PHASE_START: lr_start or first_round,
            LEDGER_SCOPE_RECORD: scope,
        },
    )
    final: dict[str, str] = {}

    def on_round(report: RoundReport) -> None:
        _record_round(outputs, report, first_round + num_rounds - 1)
        if report.version is not None:
            final.update(
                checkpoint=report.version.checkpoint_uri, version=report.version.name
            )
        catalog.renew_lease(run_id, dep.lease_ttl)

    # the nodes first: central DP's noise and accounting depend on how many there are
    n_nodes = wait_for_nodes(grid, cfg.training.min_nodes)
    ledger = latest_ledger(catalog) if cfg.privacy.central_dp_epsilon > 0 else None
    if ledger is not None:
        log.info("central DP: continuing the privacy ledger an earlier run recorded")
    # secagg=true: the same rounds, trained through SecAgg+ (apps/secagg.py)
    strategy = catalog_strategy_class(cfg)(
        make_inner_strategy(cfg, n_nodes, ledger),
        catalog=catalog,
        store=store,
        model_args=args,
        run_id=run_id,
        lr_fn=cfg.lr_at,
        promote=dep.promote,
        evaluate_fn=central,
        on_round=on_round,
        provenance=provenance,
        seed=cfg.training.seed,
        distill_rounds=growth.distill_rounds if growth.distill_weight > 0 else 0,
        central_dp=cfg.privacy.central_dp,
        dispatch_stagger=cfg.simulation.dispatch_stagger,
        link=Link(
            cfg.link.update_compression,
            cfg.link.topk_fraction,
            cfg.link.downlink_compression,
            cfg.training.seed,
            run_id,
        ),
        evaluate_on_arrival=cfg.evaluation.evaluate_on_arrival,
        calibration=(
            CalibrationSettings() if growth.head_calibration != "none" else None
        ),
    )
    if current is not None:
        strategy.restore_server_state(current)
    log.info(
        "%d nodes connected; rounds %d..%d of %s on %s (%d classes)",
        n_nodes,
        first_round,
        first_round + num_rounds - 1,
        cfg.training.strategy,
        cfg.model.model,
        class_map.num_classes,
    )
    t_start = time.time()
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=cfg.training.round_timeout,
        # whose ledgers, residuals and held models simulated devices keep
        train_config=(
            ConfigRecord({keys.DP_LEDGER_SCOPE: scope})
            if cfg.privacy.dp or cfg.link.device_state
            else None
        ),
        evaluate_config=(
            ConfigRecord({keys.DP_LEDGER_SCOPE: scope})
            if cfg.link.device_state
            else None
        ),
        class_map=class_map,
        first_round=first_round,
        parent_version=parent,
        lr_phase_start=lr_start,
    )
    _finish(outputs, time.time() - t_start, final)


def _record_round(outputs: RunOutputs, rep: RoundReport, last_round: int) -> None:
    r = rep.server_round
    acc, loss = rep.central.get("accuracy"), rep.central.get("loss")
    rejected = {b.node_id for b in rep.rejected}
    ok_train = [
        n.metrics for n in rep.train if n.error is None and n.node_id not in rejected
    ]
    ok_eval = [n.metrics for n in rep.evaluate if n.error is None]
    for kind, results, loss_key, acc_key in (
        ("node-train", rep.train, keys.TRAIN_LOSS, keys.TRAIN_ACCURACY),
        ("node-evaluate", rep.evaluate, keys.EVAL_LOSS, keys.EVAL_ACCURACY),
    ):
        for n in results:
            m = n.metrics
            outputs.add_row(
                round=r,
                kind=kind,
                node_id=str(n.node_id),
                num_examples=int(m[keys.NUM_EXAMPLES])
                if keys.NUM_EXAMPLES in m
                else None,
                loss=m.get(loss_key),
                accuracy=m.get(acc_key),
                seconds=m.get(keys.TRAIN_SECONDS),
                ignored_examples=int(m[keys.IGNORED_EXAMPLES])
                if keys.IGNORED_EXAMPLES in m
                else None,
                up_bytes=_count(m.get(UPLINK_BYTES)),
                down_bytes=_count(m.get(DOWNLINK_BYTES)),
            )
    seconds = time.time() - rep.started
    outputs.add_row(
        round=r,
        kind="round",
        num_examples=int(sum(m.get(keys.NUM_EXAMPLES, 0) for m in ok_train)),
        loss=_mean(ok_eval, keys.EVAL_LOSS),
        accuracy=_mean(ok_eval, keys.EVAL_ACCURACY),
        central_loss=loss,
        central_accuracy=acc,
        nodes_sampled=rep.sampled,
        nodes_replied=len(ok_train),
        nodes_failed=len(rep.rejected),
        lr=rep.lr,
        seconds=seconds,
        up_bytes=int(sum(m.get(UPLINK_BYTES, 0) for m in ok_train)),
        down_bytes=int(sum(m.get(DOWNLINK_BYTES, 0) for m in ok_train)),
    )
    outputs.flush()
    train_loss = _mean(ok_train, keys.TRAIN_LOSS)
    extra = ""
    if rep.grew_from is not None:
        extra += f", head grew {rep.grew_from}->{rep.class_map.num_classes}"
    if rep.rolled_back_to:
        extra += f", continued from rolled-back version {rep.rolled_back_to}"
    if rep.rejected:  # e.g. "1 rejected (1 unavailable)": a dead node, a bad reply
        kinds = Counter(b.failure or "dropped" for b in rep.rejected)
        why = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        extra += f", {len(rep.rejected)} rejected ({why})"
    up = _per_node(ok_train, UPLINK_BYTES)
    down = _per_node(ok_train, DOWNLINK_BYTES)
    link = (
        f", link {up / 1e3:.0f} kB up / {down / 1e3:.0f} kB down per node"
        if up is not None and down is not None
        else ""
    )
    log.info(
        "round %d/%d: %d/%d nodes replied%s, train loss %s, central accuracy %s "
        "(loss %s), version %s, %.1f s%s",
        r,
        last_round,
        len(ok_train),
        rep.sampled,
        extra,
        "n/a" if train_loss is None else f"{train_loss:.4f}",
        "n/a" if acc is None else f"{acc:.4f}",
        "n/a" if loss is None else f"{loss:.4f}",
        rep.version.name if rep.version else "-",
        seconds,
        link,
    )


def _finish(outputs: RunOutputs, seconds: float, final: dict[str, str]) -> None:
    rounds = outputs.round_rows()
    last = rounds[-1] if rounds else {}
    png = outputs.plot() if rounds else None
    summary = {
        "run_id": outputs.run_id,
        "rounds": len(rounds),
        "final_central_accuracy": last.get("central_accuracy"),
        "final_federated_accuracy": last.get("accuracy"),
        "best_central_accuracy": max(
            (
                r["central_accuracy"]
                for r in rounds
                if r["central_accuracy"] is not None
            ),
            default=None,
        ),
        "seconds": seconds,
        "outputs_dir": str(outputs.root),
        "final_checkpoint": final.get("checkpoint"),
        "final_version": final.get("version"),
        "plot": str(png) if png else None,
    }
    write_json_atomic(Path(outputs.root) / "summary.json", summary)
    acc = summary["final_central_accuracy"]
    log.info(
        "done in %.0f s: final central accuracy %s; outputs in %s",
        seconds,
        "n/a" if acc is None else f"{acc:.4f}",
        outputs.root,
    )
