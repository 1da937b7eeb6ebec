"""The docs as a guide (issue 19): a short README that starts with the two
commands, a page per task, and no relative link that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
PAGES = (
    "own-images-and-deployment.md",
    "class-growth.md",
    "privacy.md",
    "secure-aggregation.md",
    "simulation.md",
    "edge.md",
    "slow-links.md",
    "admin-api-and-console.md",
    "configuration.md",
    "results.md",
)

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def linked_files() -> list[Path]:
    files = [README, ROOT / "simulations" / "README.md"]
    return files + sorted(DOCS.glob("*.md"))


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """Numbered lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            where = f"{path.relative_to(root)}:{number}: {target}"
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.is_relative_to(root):
                problems.append(f"{where} (outside the repository)")
            elif not dest.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no such heading)")
    return problems


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    block = re.search(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no code block"
    commands = [
        line.split("#", 1)[0].strip()
        for line in block.group(1).splitlines()
        if line.split("#", 1)[0].strip()
    ]
    assert commands[:2] == ["make demo", "make test"], commands


def test_readme_names_the_tested_flower_version_once() -> None:
    named = re.findall(r"Flower (\d+\.\d+\.\d+)", README.read_text())
    assert len(named) == 1, named
    pinned = re.search(
        r'"flwr\[[a-z,]+\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert pinned is not None and named[0] == pinned.group(1)


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_exists(page: str) -> None:
    assert (DOCS / page).is_file(), f"docs/{page} is missing"


@pytest.mark.parametrize("path", linked_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(path: Path) -> None:
    assert broken_links(path) == []


def test_link_checker_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("# Results\n\n## Privacy\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[gone](missing.md) [ok](results.md#privacy) `[code](nope.md)`\n"
        "[bad anchor](results.md#no-such-heading) [web](https://flower.ai)\n"
        "```\n[fenced](nope.md)\n```\n"
        "[out](../../elsewhere.md) ![img](results.md)\n"
    )
    found = [p.split(": ", 1)[1] for p in broken_links(page, tmp_path.resolve())]
    assert found == [
        "missing.md (no such file)",
        "results.md#no-such-heading (no such heading)",
        "../../elsewhere.md (outside the repository)",
    ]
