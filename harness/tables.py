"""Validated dataclasses from TOML tables: an unknown key or a value of the wrong
type raises :class:`~harness.errors.ConfigError` (or the subclass given) whose
``key`` is the dotted path of the offending key, e.g. ``devices[1].caching_mode``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from harness.errors import ConfigError

T = TypeVar("T")

_CHECKS: dict[str, Callable[[Any], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def check_type(path: str, value: Any, expected: str, error: type[ConfigError] = ConfigError) -> None:
    """``expected`` is a dataclass field's annotation as text (``"int"``, ``"str | None"``...);
    annotations it does not know are not checked."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 63:
        raise error(f"{path} is out of range: TOML integers are 64-bit", key=path)
    options = [t.strip() for t in expected.split("|")]
    if value is None and "None" in options:
        return
    known = [_CHECKS[t] for t in options if t in _CHECKS]
    if known and not any(ok(value) for ok in known):
        raise error(f"{path} must be {expected}, not {type(value).__name__} {value!r}", key=path)


def from_table(cls: type[T], table: Mapping[str, Any], where: str, *, error: type[ConfigError] = ConfigError,
               ignore: Collection[str] = ("kind",), exclude: Collection[str] = (),
               convert: Mapping[str, Callable[[Any, str], Any]] | None = None) -> T:
    """Build ``cls`` (a dataclass) from ``table``.

    ``ignore``: keys accepted but not passed (the ``kind`` selector); ``exclude``:
    fields that may not come from this table; ``convert``: per-key converters
    ``(value, path) -> field value`` for nested tables. Errors raised by ``cls``
    itself (validation in ``__post_init__``) get ``where`` prefixed to their key.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.init and f.name not in exclude}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in ignore:
            continue
        path = f"{where}.{key}"
        if key not in fields:
            raise error(f"{where}: unknown key {key!r} (known: {', '.join(fields)})", key=path)
        if convert and key in convert:
            kwargs[key] = convert[key](value, path)
            continue
        check_type(path, value, str(fields[key].type), error)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise type(exc)(f"{where}: {exc}", key=f"{where}.{exc.key}" if exc.key else where) from None
