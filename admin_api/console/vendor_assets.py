"""The console's front-end libraries, vendored from npm at pinned versions.

The console must work offline on a lab network with nothing but the repository,
so its JavaScript and CSS are committed files, not a CDN or a build step. This
module is the one place their origin is written down: ``PACKAGES`` pins each npm
package and the files taken from it, and ``vendor.json`` beside the files
records every file's sha256 so a test can tell a hand-edited or truncated copy.

``python -m admin_api.console.vendor_assets`` (``make vendor``) fetches the
pinned tarballs with ``npm pack`` and rewrites the files and the manifest;
``--check`` only verifies the committed files against the manifest (no network).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC_VENDOR = Path(__file__).resolve().parent / "static" / "vendor"
TEST_VENDOR = ROOT / "tests" / "browser" / "vendor"
MANIFEST = STATIC_VENDOR / "vendor.json"


@dataclass(frozen=True)
class Package:
    """One npm package: where its files go and which ones we take."""

    name: str
    version: str
    files: tuple[str, ...]  # paths inside the tarball's ``package/`` folder
    dest: Path

    @property
    def folder(self) -> Path:
        return self.dest / self.name


PACKAGES: tuple[Package, ...] = (
    # htmx 2 (htmx 4 changed its event and SSE model; 2.x is the documented one)
    Package("htmx.org", "2.0.11", ("dist/htmx.min.js", "LICENSE"), STATIC_VENDOR),
    Package(
        "uplot",
        "1.6.32",
        ("dist/uPlot.iife.min.js", "dist/uPlot.min.css", "LICENSE"),
        STATIC_VENDOR,
    ),
    # axe-core runs only inside the browser tests: it is never served.
    Package(
        "axe-core",
        "4.14.1",
        ("axe.min.js", "LICENSE", "LICENSE-3RD-PARTY.txt"),
        TEST_VENDOR,
    ),
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_entries() -> list[dict[str, object]]:
    """What the committed files are, as the manifest records them."""
    entries: list[dict[str, object]] = []
    for pkg in PACKAGES:
        files = {Path(f).name: sha256_of(pkg.folder / Path(f).name) for f in pkg.files}
        entries.append(
            {
                "package": pkg.name,
                "version": pkg.version,
                "folder": str(pkg.folder.relative_to(ROOT)),
                "sha256": files,
            }
        )
    return entries


def fetch(pkg: Package, workdir: Path) -> None:
    """``npm pack`` one pinned package and copy its chosen files into place."""
    out = subprocess.run(
        ["npm", "pack", f"{pkg.name}@{pkg.version}", "--silent"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    pkg.folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(workdir / out) as tar:
        for name in pkg.files:
            member = tar.extractfile(f"package/{name}")
            if member is None:
                raise SystemExit(f"{pkg.name}@{pkg.version} has no {name}")
            (pkg.folder / Path(name).name).write_bytes(member.read())


def check() -> list[str]:
    """Problems with the committed files (missing, or not the manifest's bytes)."""
    recorded = json.loads(MANIFEST.read_text())
    problems = []
    if [(e["package"], e["version"]) for e in recorded] != [
        (p.name, p.version) for p in PACKAGES
    ]:
        problems.append("vendor.json does not list the pinned packages: make vendor")
    for entry in recorded:
        folder = ROOT / entry["folder"]
        for name, digest in entry["sha256"].items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif sha256_of(path) != digest:
                problems.append(f"{path} differs from vendor.json")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify only")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in PACKAGES:
            fetch(pkg, Path(tmp))
            print(f"vendored {pkg.name}@{pkg.version} into {pkg.folder}")
    MANIFEST.write_text(json.dumps(manifest_entries(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
