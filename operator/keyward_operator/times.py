"""Timestamps as the Kubernetes API writes them (RFC 3339, UTC, whole seconds), for status and messages."""

from __future__ import annotations

import datetime


def rfc3339(value: datetime.datetime) -> str:
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
