"""Timestamps as the Kubernetes API writes them (RFC 3339, UTC, whole seconds), for status and messages."""

from __future__ import annotations

import datetime
from typing import Any


def rfc3339(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_or_none(value: datetime.datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


def parse(value: Any) -> datetime.datetime | None:
    """An RFC 3339 time from a status field (UTC when it names no zone), or None when absent."""
    if not value:
        return None
    parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)
