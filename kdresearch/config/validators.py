"""The typed checks of user-typed values: Hydra passes whatever was typed (`epochs=abc`,
`device.compile=maybe`) through as a string, so every key a user can type is checked by one of
these before it is used. Each returns the value (a number as float) or raises one line naming the
key, the rule and the value: `epochs must be an integer >= 1, got 'abc'`.

This module imports nothing of the project but its error type, so every module that checks its
own options (schedules, devices, data, losses) can use it, and `check_config` can use them all.
"""

from __future__ import annotations

import math
from typing import Collection, Optional

from kdresearch.errors import KDResearchError


def _shown(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"  # 4294967295, not 4.29497e+09


def _bounds(at_least=None, above=None, at_most=None, below=None) -> str:
    """' >= 1', ' > 0', ' <= 100', ' in [0, 1)' ... ('' without bounds)."""
    low = (f"[{_shown(at_least)}" if at_least is not None else
           f"({_shown(above)}" if above is not None else None)
    high = (f"{_shown(at_most)}]" if at_most is not None else
            f"{_shown(below)})" if below is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {_shown(at_least)}" if at_least is not None else f" > {_shown(above)}"
    if high:
        return f" <= {_shown(at_most)}" if at_most is not None else f" < {_shown(below)}"
    return ""


def _outside(value, at_least=None, above=None, at_most=None, below=None) -> bool:
    return ((at_least is not None and value < at_least) or (above is not None and value <= above)
            or (at_most is not None and value > at_most) or (below is not None and value >= below))


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def integer(key: str, value, at_least: Optional[int] = None, at_most: Optional[int] = None, *,
            below: Optional[int] = None, or_null: bool = False, note: str = "") -> Optional[int]:
    """An int (not a bool, not 2.0) within the bounds; `or_null`: None passes too. `note` says
    where a bound comes from, e.g. 'the training images'."""
    if value is None and or_null:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or _outside(value, at_least, None, at_most, below):
        raise KDResearchError(f"{key} must be an integer{_bounds(at_least, None, at_most, below)}"
                              f"{' or null' if or_null else ''}{_note(note)}, got {value!r}")
    return value


def number(key: str, value, *, at_least: Optional[float] = None, above: Optional[float] = None,
           at_most: Optional[float] = None, below: Optional[float] = None, or_null: bool = False,
           note: str = "") -> Optional[float]:
    """A finite int or float (not a bool) within the bounds, as a float; `or_null`: None passes too.
    The message says which part failed: not a number, not finite, or outside the bounds."""
    if value is None and or_null:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KDResearchError(f"{key} must be a number{' or null' if or_null else ''}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise KDResearchError(f"{key} must be finite, got {value}")
    if _outside(value, at_least, above, at_most, below):
        raise KDResearchError(f"{key} must be{_bounds(at_least, above, at_most, below)}{_note(note)}, got {value:g}")
    return value


def switch(key: str, value) -> bool:
    """Exactly true or false: a string such as 'maybe', 'no' or 'false ' is refused rather than
    read as true (any non-empty string is truthy in Python)."""
    if not isinstance(value, bool):
        raise KDResearchError(f"{key} must be true or false, got {value!r}")
    return value


def name(key: str, value, *, or_null: bool = False) -> Optional[str]:
    """A non-empty string (not only spaces); `or_null`: None passes too."""
    if value is None and or_null:
        return None
    if not isinstance(value, str) or not value.strip():
        raise KDResearchError(f"{key} must be a non-empty name{' or null' if or_null else ''}, got {value!r}")
    return value


def choice(key: str, value, choices: Collection[str]):
    """One of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise KDResearchError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
