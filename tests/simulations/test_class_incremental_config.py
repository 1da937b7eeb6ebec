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
        'distill-weight=3.0 local-loss="restricted-new"',
        "distill-weight=0.0",
    )
    assert merged == (
        'num-server-rounds=10 distill-weight=0.0 database-url="sqlite:///a b.db" '
        'local-loss="restricted-new"'
    )


def test_text_that_is_not_key_value_is_refused() -> None:
    merge = _load().merge_run_config
    with pytest.raises(SystemExit, match="cannot read"):
        merge("seed=1 oops")
