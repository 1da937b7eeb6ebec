"""The staged app directory gives ``flwr run`` the same bundle as the project."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedobj.appstage import stage_app

ROOT = Path(__file__).resolve().parents[2]


def _manifest(fab: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(fab)).read(".info/CONTENT").decode().splitlines()


def test_staged_project_bundles_the_same_files_byte_for_byte(tmp_path: Path) -> None:
    staged = stage_app(ROOT, tmp_path / "app")
    assert staged == tmp_path / "app"
    assert not (staged / ".venv").exists() and not (staged / "tests").exists()
    manifest = _manifest(build_fab_from_disk(staged))
    # path, sha256 and size of every file, pyproject.toml (rewritten by Flower) too
    assert manifest == _manifest(build_fab_from_disk(ROOT))
    assert any(line.startswith("apps/server_app.py,") for line in manifest)


def test_restaging_replaces_what_was_there(tmp_path: Path) -> None:
    stale = tmp_path / "app" / "fedobj" / "stale.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("x = 1\n")
    stage_app(ROOT, tmp_path / "app")
    assert not stale.exists()


def _app(tmp_path: Path, include: str) -> Path:
    app = tmp_path / "src"
    (app / "pkg").mkdir(parents=True, exist_ok=True)
    (app / "pkg" / "mod.py").write_text("")
    (app / "pyproject.toml").write_text(
        "[project]\nname='x'\nversion='1.0.0'\n[tool.flwr.app]\n"
        f"publisher='p'\n{include}\n"
    )
    return app


def test_apps_whose_bundle_cannot_be_told_are_not_staged(tmp_path: Path) -> None:
    for include in (
        "",
        "fab-include = ['**/*.py']",
        "fab-include = ['../x/**']",
        "fab-include = ['./pkg/**']",
    ):
        app = _app(tmp_path, include)
        assert stage_app(app, tmp_path / "app") == app
        assert not (tmp_path / "app").exists()


def test_a_named_directory_is_copied_without_caches(tmp_path: Path) -> None:
    app = _app(tmp_path, "fab-include = ['pkg/**']")
    (app / "pkg" / "__pycache__").mkdir()
    (app / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (app / "big").mkdir()
    staged = stage_app(app, tmp_path / "app")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*")) == [
        "pkg",
        "pkg/mod.py",
        "pyproject.toml",
    ]
