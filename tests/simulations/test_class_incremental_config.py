"""The class-incremental scenario's run-config merging (Flower refuses a key
given twice, so an override must replace the scenario's own value)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "simulations" / "class_incremental" / "run.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("class_incremental_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_later_key_replaces_an_earlier_one_and_quotes_survive() -> None:
    merge = _load().merge_run_config
    merged = merge(
        'num-server-rounds=10 distill-weight=1.0 database-url="sqlite:///a b.db"',
        "",
        'distill-weight=3.0 head-calibration="virtual-features"',
        "distill-weight=0.0",
    )
    assert merged == (
        'num-server-rounds=10 distill-weight=0.0 database-url="sqlite:///a b.db" '
        'head-calibration="virtual-features"'
    )


def test_text_that_is_not_key_value_is_refused() -> None:
    merge = _load().merge_run_config
    with pytest.raises(SystemExit, match="cannot read"):
        merge("seed=1 oops")


def test_a_retired_key_ends_the_script_naming_it() -> None:
    merge = _load().merge_run_config
    with pytest.raises(SystemExit, match="`local-loss` was retired"):
        merge("seed=1", 'local-loss="restricted-new"')


@pytest.mark.parametrize("setting", ["shared", "disjoint"])
def test_every_variant_trains_on_the_same_nodes_data(
    setting: str, tmp_path: Path
) -> None:
    """Joint training is the baseline only if its nodes hold the growing runs'
    images: in *disjoint* it must split at the same class although its catalog
    starts with all 10 (split at 10, its new-only nodes held nothing)."""
    from flwr.common.config import parse_config_args

    from fedobj.config import RunConfig

    run = _load()
    args = run.argparse.Namespace(
        rounds=10, nodes=10, grow_after=4, recipe="default", run_config=""
    )
    configs = {
        variant: RunConfig.from_flower(
            parse_config_args(
                [run.scenario_run_config(variant, setting, 42, args, tmp_path / "c.db")]
            )
        )
        for variant in ("distill", "no-distill", "joint")
    }
    splits = {variant: cfg.data_split for variant, cfg in configs.items()}
    expected = (6, 0.3) if setting == "disjoint" else None
    assert set(splits.values()) == {expected}, splits
    assert configs["joint"].growth.initial_categories == 10
    assert configs["distill"].growth.initial_categories == 6
    assert configs["distill"].growth.distill_weight > 0
    assert configs["no-distill"].growth.distill_weight == 0


def test_old_rows_accuracy_ignores_the_new_rows_and_only_them() -> None:
    """A grown head whose new rows win every image: 10-way old-class accuracy
    falls to 0, the old rows' own accuracy is the 6-row model's exactly."""
    import torch

    from fedobj.data.categories import fashion_mnist_class_map
    from fedobj.model import Checkpoint, ModelArgs, build_model
    from fedobj.model.factory import head_keys
    from fedobj.train import evaluate, map_to_class_map

    run = _load()
    full = fashion_mnist_class_map()
    six = type(full)(full.entries[: run.OLD])
    torch.manual_seed(0)
    small_args = ModelArgs("cnn", run.OLD)
    small = build_model(small_args).eval()
    test = run._test_set(1, 28)
    want = evaluate(small, map_to_class_map(test, six).tensors).per_class_accuracy
    assert 0 < sum(want.values()) / run.OLD < 1  # not trivially right or wrong

    big_args = ModelArgs("cnn", 10)
    state = build_model(big_args).state_dict()
    state.update({k: v for k, v in small.state_dict().items() if k in state})
    weight, bias = head_keys(big_args)
    state[weight] = torch.cat([small.state_dict()[weight], torch.zeros(4, 128)])
    state[bias] = torch.cat([small.state_dict()[bias], torch.full((4,), 1e6)])
    grown = Checkpoint(big_args, full, state)
    got = evaluate(grown.build(), map_to_class_map(test, full).tensors)
    assert sum(got.per_class_accuracy[k] for k in range(run.OLD)) == 0
    assert run.old_rows_accuracy(grown) == pytest.approx(
        sum(want.values()) / run.OLD, abs=1e-12
    )


def test_the_summary_takes_both_drops_from_the_last_round_before_growth() -> None:
    def row(rnd: int, classes: int, old: float, rows: float) -> dict[str, object]:
        return {
            "setting": "shared",
            "variant": "distill",
            "seed": 1,
            "round": rnd,
            "classes": classes,
            "old_accuracy": old,
            "old_rows_accuracy": rows,
            "new_accuracy": 0.0,
            "all_accuracy": old,
        }

    rows = [row(1, 6, 0.7, 0.7), row(2, 6, 0.9, 0.9)]
    rows += [row(3, 10, 0.8, 0.88), row(4, 10, 0.85, 0.86), row(5, 10, 0.9, 0.9)]
    summary = _load().summarise(rows)
    assert summary["grew_at_round"] == 3
    assert summary["old_accuracy_before_growth"] == 0.9
    assert summary["max_old_drop_after_growth"] == pytest.approx(0.1)
    assert summary["max_old_rows_drop_after_growth"] == pytest.approx(0.04)
