"""Run-config validation, the `fedobj` CLI, and the run outputs writer."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fedobj.cli import app
from fedobj.config import KEYS, RETIRED, SECTIONS, RunConfig, parse_overrides
from fedobj.errors import ConfigError
from fedobj.outputs import RunOutputs, code_revision, package_versions
from tests.conftest import ROOT, write_image_folder

runner = CliRunner()


def test_pyproject_declares_every_run_config_key_with_valid_defaults() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"
    ]["config"]
    ours = set(RunConfig().to_flower())
    assert set(declared) == ours, set(declared) ^ ours
    cfg = RunConfig.from_flower(declared)
    assert cfg.to_flower() == declared  # the embedded defaults are the typed ones


@pytest.mark.parametrize(
    "key,value",
    [
        ("num-server-rounds", 0),
        ("dirichlet-alpha", 0.0),
        ("dirichlet-alpha", -1.0),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", 2.0),
        ("model", "resnet"),
        ("strategy", "fedsgd"),
        ("lr", 0.0),
        ("partitioner", "random"),
        ("outputs-dir", "relative/path"),
        ("num-server-rounds", "five"),
        ("num-server-rounds", 2.5),
        ("resume", 1),
        ("central-eval-dir", "relative/folder"),
        ("split-first-new", -1),
        ("split-first-new", 10),
    ],
)
def test_bad_run_config_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({key: value})
    assert f"`{key}`" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", sorted(RETIRED))
def test_a_retired_key_is_refused_in_one_line_that_says_so(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"lr": 0.01, key: 1})
    message = str(err.value)
    assert f"run config `{key}` was retired" in message and "\n" not in message


def test_an_unknown_key_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="`num-server-round` is not a key"):
        RunConfig.from_flower({"num-server-round": 3})
    assert not set(RETIRED) & set(KEYS)  # a retired key is never a live one too


def test_fedobj_run_refuses_a_retired_key_before_starting_anything(
    tmp_path: Path,
) -> None:
    result = runner.invoke(
        app, ["run", "--run-config", 'num-server-rounds=2 head-align="norm"']
    )
    assert result.exit_code == 1
    assert "run config `head-align` was retired" in result.output
    preset = tmp_path / "old.toml"
    preset.write_text('lr = 0.01\nlocal-loss = "restricted"\n')
    result = runner.invoke(app, ["run", "--run-config", str(preset)])
    assert result.exit_code == 1 and "`local-loss` was retired" in result.output


def test_overrides_are_read_as_flower_reads_them(tmp_path: Path) -> None:
    text = 'num-server-rounds=3 model="mobilenet_v3_small" dp=true lr=0.1'
    assert parse_overrides(text) == {
        "num-server-rounds": 3,
        "model": "mobilenet_v3_small",
        "dp": True,
        "lr": 0.1,
    }
    preset = tmp_path / "p.toml"
    preset.write_text('strategy = "fedprox"\nproximal-mu = 0.1\n')
    assert parse_overrides(str(preset)) == {"strategy": "fedprox", "proximal-mu": 0.1}


def test_sections_group_every_key_once_and_round_trip() -> None:
    cfg = RunConfig.from_flower({"dp-epsilon": 4.0, "secagg-max-weight": 500.0})
    assert cfg.privacy.dp_epsilon == 4.0 and cfg.secagg.secagg_max_weight == 500.0
    flat = cfg.to_flower()
    assert set(flat) == set(KEYS) and RunConfig.from_flower(flat) == cfg
    names = [key for section in SECTIONS for key in section().to_flower()]
    assert len(names) == len(set(names)) == len(KEYS)


def test_disjoint_split_point_is_initial_categories_unless_set() -> None:
    growing = RunConfig.from_flower(
        {"class-split": "disjoint", "initial-categories": 6}
    )
    assert growing.data_split == (6, 0.3)
    # joint training (all 10 from round 1) on the growing run's data
    joint = RunConfig.from_flower(
        {"class-split": "disjoint", "initial-categories": 10, "split-first-new": 6}
    )
    assert joint.data_split == growing.data_split
    assert RunConfig.from_flower({"split-first-new": 6}).data_split is None


def test_run_config_types_are_coerced() -> None:
    cfg = RunConfig.from_flower({"lr": 1, "num-server-rounds": 3, "model": "cnn"})
    t = cfg.training
    assert t.lr == 1.0 and isinstance(t.lr, float) and t.num_server_rounds == 3


def test_outputs_dir_resolution(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDOBJ_OUTPUTS_DIR", str(tmp_path / "env"))
    assert RunConfig().resolve_outputs_dir() == tmp_path / "env"
    explicit = RunConfig.from_flower({"outputs-dir": str(tmp_path / "x")})
    assert explicit.resolve_outputs_dir() == tmp_path / "x"
    monkeypatch.delenv("FEDOBJ_OUTPUTS_DIR")
    monkeypatch.chdir(tmp_path)
    assert RunConfig().resolve_outputs_dir() == tmp_path / "outputs"


def test_data_check_reports_counts_and_skips(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "dev", per_class=3, classes=2)
    (root / "trouser" / "x.pdf").write_bytes(b"%PDF-1.4")
    (root / "trouser" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (root / "loose.jpg").write_bytes(b"")
    result = runner.invoke(app, ["data", "check", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["counts"] == {"t-shirt-top": 3, "trouser": 3}
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons["trouser/x.pdf"].startswith("not an image")
    assert reasons["trouser/cut.png"].startswith("unreadable")
    assert reasons["loose.jpg"] == "outside any category folder"
    table = runner.invoke(app, ["data", "check", str(root)])
    assert (
        table.exit_code == 0 and "trouser" in table.output and "skipped" in table.output
    )


def test_data_check_fails_clearly_on_unusable_folders(tmp_path: Path) -> None:
    (tmp_path / "shoe").mkdir()
    (tmp_path / "shoe" / "a.txt").write_text("x")
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 1 and "no usable images" in result.output
    missing = runner.invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_run_outputs_rows_parquet_plot_and_cli(tmp_path: Path) -> None:
    out = RunOutputs.create(tmp_path, "123")
    out.write_run_info({"code_revision": code_revision(), **package_versions()})
    for r, acc in ((1, 0.5), (2, 0.7)):
        out.add_row(round=r, kind="node-train", node_id="9", num_examples=10, loss=1.0)
        out.add_row(
            round=r,
            kind="round",
            central_accuracy=acc,
            central_loss=1 - acc,
            nodes_sampled=2,
            nodes_replied=2,
            lr=0.1,
            seconds=1.5,
        )
    with pytest.raises(KeyError):
        out.add_row(round=3, kind="round", bogus=1)
    rows = pq.read_table(out.flush()).to_pylist()
    assert [r["kind"] for r in rows] == ["node-train", "round"] * 2
    assert out.plot().stat().st_size > 5_000
    assert (tmp_path / "latest").resolve() == out.root.resolve()
    (out.root / "summary.json").write_text(
        json.dumps(
            {
                "run_id": "123",
                "rounds": 2,
                "seconds": 3.0,
                "final_central_accuracy": 0.7,
            }
        )
    )
    shown = runner.invoke(app, ["runs", "show", "latest", "--outputs", str(tmp_path)])
    assert shown.exit_code == 0 and "0.7000" in shown.output, shown.output
    listed = runner.invoke(app, ["runs", "list", "--outputs", str(tmp_path)])
    assert listed.exit_code == 0 and "123" in listed.output
    none = runner.invoke(app, ["runs", "show", "999", "--outputs", str(tmp_path)])
    assert none.exit_code == 2


@pytest.mark.parametrize(
    "preset", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name
)
def test_presets_use_declared_keys_and_valid_values(preset: Path) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"
    ]["config"]
    values = tomllib.loads(preset.read_text())
    assert set(values) <= set(declared), set(values) - set(declared)
    RunConfig.from_flower({**declared, **values})
