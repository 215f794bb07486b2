"""One structured audit event per key operation and per cryptographic call.

Events go to the ``keyward.audit`` logger as JSON fields (see keyward.logs): who asked, what, on which
key and version, the outcome and, for data operations, the latency. Never a PIN, plaintext or key bytes.
"""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger("keyward.audit")


def emit(event: str, *, outcome: str, **fields: Any) -> None:
    """Writes one audit event. ``outcome`` is "success" or a short error class name."""
    payload = {"audit": True, "event": event, "outcome": outcome}
    payload.update({k: v for k, v in fields.items() if v is not None})
    level = logging.INFO if outcome == "success" else logging.WARNING
    _log.log(level, event, extra={"fields": payload})
