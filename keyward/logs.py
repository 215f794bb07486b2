"""Structured JSON logging for every Keyward process (plugin, operator, CLI).

One JSON object per line on stderr. Call sites log a short event name as the message and pass the
structured fields as ``extra={"fields": {...}}``; the formatter merges them into the line. Nothing in
Keyward ever passes a PIN, plaintext or key material as a field, so the formatter does not try to redact;
it only refuses to render arbitrary objects (they are turned into their ``str``).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

AUDIT_LOGGER = "keyward.audit"


class JsonFormatter(logging.Formatter):
    """Renders a LogRecord as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(line, default=str, sort_keys=False)


def configure(level: str = "info") -> None:
    """Sends every logger's records to stderr as JSON lines. Idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_keyward", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._keyward = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter that would otherwise drown the audit trail.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
