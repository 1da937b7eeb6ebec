"""The console's vendored front-end files are the pinned npm packages' bytes."""

from __future__ import annotations

import json

from admin_api.console import vendor_assets


def test_vendored_files_match_the_manifest_and_the_pins() -> None:
    assert vendor_assets.check() == []
    recorded = json.loads(vendor_assets.MANIFEST.read_text())
    for entry in recorded:
        assert "LICENSE" in entry["sha256"], entry["package"]  # licence shipped


def test_a_changed_file_is_caught(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    entries = json.loads(vendor_assets.MANIFEST.read_text())
    entries[0]["sha256"]["htmx.min.js"] = "0" * 64
    fake = tmp_path / "vendor.json"
    fake.write_text(json.dumps(entries))
    monkeypatch.setattr(vendor_assets, "MANIFEST", fake)
    assert any("differs" in p for p in vendor_assets.check())
