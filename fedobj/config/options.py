"""How a run-config key is declared: its section, default, type and one line.

Flower's run config is flat (``lr``, ``dp-epsilon``, ``secagg-num-shares``) and
the SuperLink accepts only keys that ``pyproject.toml`` declares. In code the keys
are grouped by concern into frozen dataclasses, one per section; a field ``x_y``
is the key ``x-y`` (greppable both ways), and its metadata carries what the
reference (``docs/configuration.md``) says about it, so that a test can hold the
two together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from fedobj.errors import ConfigError

Need = Callable[[bool, str, str], None]
"""``need(ok, key, rule)``: raise ``run config `key` rule, got value`` unless ok."""


def option(default: Any, doc: str, allowed: str = "") -> Any:
    """A run-config field: ``default``, a one-line ``doc`` and, for keys whose
    values are a closed set or a range, the ``allowed`` values as the reference
    prints them (``"cnn | mobilenet_v3_small"``, ``"(0, 1]"``)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "allowed": allowed})


def key_of(field_name: str) -> str:
    """The run-config key of a section's field (``dp_epsilon`` -> ``dp-epsilon``)."""
    return field_name.replace("_", "-")


class Section:
    """A group of run-config keys that one concern reads.

    Subclasses are frozen dataclasses whose fields are declared with
    :func:`option`; ``check`` validates the section's own keys (combinations
    across sections are :mod:`fedobj.config.run`'s), and runs when the section
    is built, so no section holds a value its readers would have to re-check.
    """

    NAME: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check(self._need)

    def _need(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            value = getattr(self, key.replace("-", "_"))
            raise ConfigError(f"run config `{key}` {rule}, got {value!r}")

    def check(self, need: Need) -> None:
        """Validate this section's keys (override; the default checks nothing)."""

    @classmethod
    def fields(cls) -> Iterator[dataclasses.Field[Any]]:
        """The section's keys as dataclass fields, in declaration order."""
        yield from dataclasses.fields(cls)  # type: ignore[arg-type]

    @classmethod
    def default_of(cls, name: str) -> Any:
        """The default of the field ``name``."""
        return next(f.default for f in cls.fields() if f.name == name)

    def to_flower(self) -> dict[str, Any]:
        """This section's keys and values as Flower's flat run config spells them."""
        return {key_of(f.name): getattr(self, f.name) for f in self.fields()}


def coerce(key: str, default: Any, value: Any) -> Any:
    """``value`` as the type of ``default`` (TOML gives ``1`` for ``1.0``); a
    bool is never taken for a number, nor a number for a bool."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"run config `{key}` must be {type(default).__name__}, got {value!r}"
        ) from None
