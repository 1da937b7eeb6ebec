"""The reference tables of ``docs/configuration.md``, rendered from the code.

Each section's keys, defaults, types and one-line descriptions live on the
dataclass fields (:func:`fedobj.config.options.option`); the page holds these
tables verbatim, and a test fails when the two differ, so the reference cannot
name a key the code does not know, nor miss one it does.
"""

from __future__ import annotations

import json
from typing import Any

from fedobj.config.options import Section, key_of
from fedobj.config.retired import RETIRED

HEADER = "| key | default | type | what it does |\n| --- | --- | --- | --- |"


def toml_value(value: Any) -> str:
    """A default as a run config writes it (``"cnn"``, ``true``, ``0.03``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def cell(text: str) -> str:
    """Table-cell text: a ``|`` would end the cell, even inside backticks."""
    return text.replace("|", "\\|")


def section_table(section: type[Section]) -> str:
    """One section's keys as a Markdown table."""
    rows = [HEADER]
    for f in section.fields():
        kind = type(f.default).__name__
        allowed = f.metadata.get("allowed", "")
        typ = f"{kind}: {allowed}" if allowed else kind
        cells = (
            f"`{key_of(f.name)}`",
            f"`{toml_value(f.default)}`",
            typ,
            f.metadata["doc"],
        )
        rows.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(rows)


def retired_table() -> str:
    """The retired keys and why each went."""
    rows = ["| key | retired because |", "| --- | --- |"]
    rows += [f"| `{key}` | {cell(why)} |" for key, why in sorted(RETIRED.items())]
    return "\n".join(rows)
