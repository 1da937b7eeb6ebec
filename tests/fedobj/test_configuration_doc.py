"""docs/configuration.md is the reference: it must list every key the code
knows, in the section the code puts it, with the code's default and type, and
name no key the code does not know."""

from __future__ import annotations

import re

import pytest

from fedobj.config import KEYS, RETIRED, SECTIONS
from fedobj.config.options import Section
from fedobj.config.reference import retired_table, section_table
from tests.conftest import ROOT

DOC = ROOT / "docs" / "configuration.md"
ROW_KEY = re.compile(r"^\| `([a-z0-9-]+)` \|")


def table_after(marker: str) -> str:
    """The Markdown table that follows ``<!-- marker -->`` in the page."""
    lines = DOC.read_text().splitlines()
    start = lines.index(f"<!-- {marker} -->") + 1
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.NAME)
def test_each_sections_table_is_the_codes(section: type[Section]) -> None:
    assert table_after(f"keys: {section.NAME}") == section_table(section), (
        f"docs/configuration.md: the {section.NAME} table differs from the code; "
        f"it should read:\n{section_table(section)}"
    )


def test_the_retired_keys_table_is_the_codes() -> None:
    assert table_after("retired") == retired_table()


def test_the_page_names_no_key_the_code_does_not_know() -> None:
    named = {
        m.group(1)
        for line in DOC.read_text().splitlines()
        if (m := ROW_KEY.match(line))
    }
    assert named - set(KEYS) - set(RETIRED) == set()
    assert set(KEYS) <= named and set(RETIRED) <= named
