"""Durations as RotationPolicy writes them: 90d, 12h, 1h30m, 20s (days, hours, minutes, seconds)."""

from __future__ import annotations

import datetime
import re

_RE = re.compile(r"^(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?$")


class DurationError(ValueError):
    """A duration that cannot be parsed; the message names the field."""


def parse(text: str, *, field: str) -> datetime.timedelta:
    match = _RE.match(text or "")
    if not text or match is None:
        raise DurationError(f"{field} must be a duration such as 90d, 12h or 1h30m, not {text!r}")
    parts = {k: int(v) for k, v in match.groupdict().items() if v}
    return datetime.timedelta(
        days=parts.get("d", 0), hours=parts.get("h", 0), minutes=parts.get("m", 0), seconds=parts.get("s", 0)
    )


def format_duration(value: datetime.timedelta) -> str:
    seconds = int(value.total_seconds())
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"
