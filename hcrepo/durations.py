"""Durations as people write them, the same everywhere: `500ms`, `2s`, `1.5min`, `1h`.

SQL `-- timeout:` directives and every duration setting read them with `parse`; a setting
given as a bare number keeps its documented unit (seconds, or milliseconds for
`SLOW_QUERY_THRESHOLD`).
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|min|h)$")
_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0}
EXAMPLES = "500ms, 2s, 1.5min or 1h"


def parse(text: str) -> float:
    """Seconds in `text`; `ValueError` naming the accepted forms (never echoing the text)."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise ValueError(f"must be a duration such as {EXAMPLES}")
    return float(found["amount"]) * _SECONDS[found["unit"]]


def setting(value: object, unit_seconds: float = 1.0) -> object:
    """A duration setting's value in the setting's own unit (`unit_seconds` long): a string
    with a unit is converted, a bare number (or numeric string) is taken as it is; anything
    else is left to the field's validation."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            return parse(text) / unit_seconds
    return value
