"""Config-dataclass helpers shared by every validated config (RoPE, search, run groups): building
one from a dict with unknown keys named, and integer checks.

Level 0: imports nothing from megarope; the caller passes its error type, called as
``error(field, message)`` (a :class:`megarope.errors.MegaropeError` subclass).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")
ErrorType = Callable[[str, str], Exception]


def from_dict(cls: type[T], values: Mapping[str, Any], error: ErrorType, prefix: str = "") -> T:
    """``cls(**values)``, first rejecting a key that is not a field of ``cls``; the error names
    ``prefix + key`` (e.g. ``stages[2].search.`` + ``popsize``)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise error(f"{prefix}{unknown[0]}", f"unknown setting; known: {known}")
    return cls(**values)


def check_int(value: Any, field: str, minimum: int, error: ErrorType) -> None:
    """``value`` is an int (not a bool, nor a float such as 2.0) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(field, f"must be an integer >= {minimum}, got {value!r}")
