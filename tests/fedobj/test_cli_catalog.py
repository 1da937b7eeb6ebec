"""`fedobj catalog …`, `fedobj versions …` and `fedobj data check --db` against a
real SQLite catalog."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedobj.catalog import SyncCatalog
from fedobj.cli import app
from fedobj.data.categories import fashion_mnist_class_map
from tests.conftest import write_image_folder

runner = CliRunner()


def test_catalog_commands(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    out = runner.invoke(app, ["catalog", "add", "Ankle boot", "--db", db])
    assert out.exit_code == 0 and "'ankle-boot') as class 0" in out.output, out.output
    runner.invoke(app, ["catalog", "add", "Bag", "--db", db])
    dup = runner.invoke(app, ["catalog", "add", "  ANKLE BOOT ", "--db", db])
    assert dup.exit_code == 2 and "error" in dup.output
    off = runner.invoke(app, ["catalog", "deactivate", "0", "--db", db])
    assert off.exit_code == 0 and "class 0" in off.output
    listed = runner.invoke(app, ["catalog", "list", "--db", db])
    assert "bag" in listed.output and "ankle-boot" not in listed.output
    everything = runner.invoke(app, ["catalog", "list", "--all", "--db", db])
    assert "ankle-boot" in everything.output
    missing = runner.invoke(app, ["catalog", "deactivate", "nope", "--db", db])
    assert missing.exit_code == 2


def test_versions_commands(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    catalog = SyncCatalog(db)
    catalog.migrate()
    cm = fashion_mnist_class_map()
    for r in (1, 2):
        catalog.register_version(
            run_id="r1",
            round=r,
            class_map=cm,
            metrics={"accuracy": 0.5 + r / 10},
            checkpoint_uri=f"/x/{r}.pt",
            checkpoint_sha256="0" * 64,
        )
    listed = runner.invoke(app, ["versions", "list", "--db", db])
    assert (
        listed.exit_code == 0 and "v0002" in listed.output and "0.7000" in listed.output
    )
    back = runner.invoke(app, ["versions", "rollback", "v0001", "--db", db])
    assert back.exit_code == 0 and "v0001" in back.output
    shown = json.loads(runner.invoke(app, ["versions", "show", "--db", db]).output)
    assert shown["name"] == "v0001" and shown["current"] is True
    assert len(shown["class_map"]) == 10
    bad = runner.invoke(app, ["versions", "rollback", "v0099", "--db", db])
    assert bad.exit_code == 2 and "v0099" in bad.output


def test_versions_prune_keeps_current_newest_and_parents(tmp_path: Path) -> None:
    from fedobj.model import Checkpoint, ModelArgs, build_model
    from fedobj.registry import ArtifactStore

    db = str(tmp_path / "c.db")
    catalog = SyncCatalog(db)
    catalog.migrate()
    store = ArtifactStore(tmp_path / "reg")
    cm = fashion_mnist_class_map()
    ckpt = Checkpoint(
        ModelArgs("cnn", 10), cm, build_model(ModelArgs("cnn", 10)).state_dict()
    )
    parent = None
    for r in range(1, 6):
        art = store.save_checkpoint(f"r/{r}.pt", ckpt)
        v = catalog.register_version(
            run_id="r",
            round=r,
            class_map=cm,
            metrics={},
            checkpoint_uri=art.uri,
            checkpoint_sha256=art.sha256,
            parent=parent,
        )
        parent = v.id
    catalog.set_current("v0001")
    exports = {}
    for fmt in ("onnx", "ort"):  # exports of v0002 (bytes stand in for models)
        art = store.put_bytes(f"versions/v0002/model.{fmt}", fmt.encode() * 10)
        catalog.record_artifact(
            "v0002", fmt, uri=art.uri, sha256=art.sha256, size=art.size
        )
        exports[fmt] = art.uri
    catalog.record_artifact(  # the server choice points at the onnx file
        "v0002", "server", uri=exports["onnx"], sha256="x", size=1
    )
    dry = runner.invoke(
        app,
        [
            "versions",
            "prune",
            "--keep",
            "2",
            "--dry-run",
            "--registry",
            str(tmp_path / "reg"),
            "--db",
            db,
        ],
    )
    assert dry.exit_code == 0 and "would prune 1 versions: v0002" in dry.output
    done = runner.invoke(
        app,
        [
            "versions",
            "prune",
            "--keep",
            "2",
            "--registry",
            str(tmp_path / "reg"),
            "--db",
            db,
        ],
    )
    assert done.exit_code == 0, done.output
    by_name = {v.name: v for v in catalog.list_versions()}
    # kept: v0005, v0004 (newest), v0003 (parent of v0004), v0001 (current)
    assert [n for n, v in sorted(by_name.items()) if v.pruned] == ["v0002"]
    assert not (tmp_path / "reg" / "r" / "2.pt").exists()
    assert not any(store.exists(u) for u in exports.values())  # exports go too
    assert (tmp_path / "reg" / "r" / "1.pt").exists()


def test_admin_keys_commands_and_cli_writes_are_audited(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from fedobj.apikeys import hash_token, key_id_of, load_secret

    monkeypatch.delenv("FEDOBJ_API_SECRET", raising=False)
    db = str(tmp_path / "c.db")
    made = runner.invoke(
        app,
        ["admin", "keys", "create", "--role", "viewer", "--name", "grafana"]
        + ["--db", db, "--outputs", str(tmp_path)],
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    key_id = key_id_of(token)
    assert key_id is not None
    secret_file = tmp_path / "api-secret"
    assert secret_file.stat().st_mode & 0o077 == 0  # owner-only
    catalog = SyncCatalog(db)
    stored = catalog.list_api_keys()[0]
    assert stored.key_hash == hash_token(load_secret(secret_file), token)

    listed = runner.invoke(app, ["admin", "keys", "list", "--db", db])
    assert key_id in listed.output and "grafana" in listed.output
    assert token not in listed.output
    bad_role = runner.invoke(
        app, ["admin", "keys", "create", "--role", "root", "--db", db]
    )
    assert bad_role.exit_code == 2 and "role" in bad_role.output
    gone = runner.invoke(app, ["admin", "keys", "revoke", key_id, "--db", db])
    assert gone.exit_code == 0 and "revoked" in gone.output
    assert catalog.list_api_keys() == []
    unknown = runner.invoke(app, ["admin", "keys", "revoke", "0000000000", "--db", db])
    assert unknown.exit_code == 2

    runner.invoke(app, ["catalog", "add", "Bag", "--db", db])
    actions = [(a.action, a.actor.split(":")[0]) for a in catalog.list_audit()]
    assert actions[:3] == [
        ("category.create", "cli"),
        ("key.revoke", "cli"),
        ("key.create", "cli"),
    ]


def test_data_check_marks_the_folders_the_catalog_does_not_know(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDOBJ_DATABASE_URL", raising=False)
    root = write_image_folder(tmp_path / "dev", per_class=2, classes=3)
    for folder in ("unknown", "Ankle Boot"):  # no category; a name, not a slug
        shutil.copytree(root / "trouser", root / folder)
    db = tmp_path / "c.db"
    catalog = SyncCatalog(db)
    catalog.migrate()
    catalog.seed_categories()
    catalog.deactivate_category("pullover")

    plain = runner.invoke(app, ["data", "check", str(root)])  # no catalog: as ever
    assert plain.exit_code == 0 and "unknown" in plain.output, plain.output
    assert "not in the catalog" not in plain.output

    found = runner.invoke(app, ["data", "check", str(root), "--json", "--db", str(db)])
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["catalog"] == {
        "known": {"t-shirt-top": 0, "trouser": 1},
        "inactive": ["pullover"],
        "unknown": {"Ankle Boot": "ankle-boot", "unknown": None},
        "trainable": 4,
    }
    # the catalog named by the environment, as the ServerApp finds it
    table = runner.invoke(
        app, ["data", "check", str(root)], env={"FEDOBJ_DATABASE_URL": str(db)}
    )
    out = " ".join(table.output.split())  # rich wraps long lines
    assert table.exit_code == 0, table.output
    assert "│ trouser │ 2 │ class 1 │" in out, out
    assert "│ unknown │ 2 │ not in the catalog: skipped │" in out, out
    assert "rename to" in out and "ankle-boot?)" in out, out  # wrapped in its cell
    assert "Ankle Boot, unknown: no category of the catalog" in out, out
    assert "pullover: deactivated in the catalog; training skips its 2" in out, out


def test_data_check_needs_a_catalog_that_exists_and_knows_a_folder(
    tmp_path: Path,
) -> None:
    root = tmp_path / "dev"
    write_image_folder(root, per_class=2, classes=1)
    (root / "t-shirt-top").rename(root / "mystery")
    missing = tmp_path / "none.db"
    gone = runner.invoke(app, ["data", "check", str(root), "--db", str(missing)])
    assert gone.exit_code == 2 and "no catalog database" in gone.output
    assert not missing.exists()  # a check creates no catalog
    catalog = SyncCatalog(tmp_path / "c.db")
    catalog.migrate()
    catalog.seed_categories()
    none = runner.invoke(app, ["data", "check", str(root), "--db", catalog.url])
    out = " ".join(none.output.split())
    assert none.exit_code == 1 and "no folder is an active category" in out, out
