"""Status conditions in the metav1.Condition shape, keyed by type (pure).

A condition's lastTransitionTime changes only when its status changes, so watchers can tell how long a key
has been in a state. Reasons are CamelCase constants, as Kubernetes conventions ask.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from keyward_operator import times

READY = "Ready"
VERSIONS_RECONCILED = "VersionsReconciled"
ROTATION_REQUEST = "RotationRequestHandled"
REENCRYPTED = "Reencrypted"
VERSIONS_RETIRED = "VersionsRetired"


def unchanged(existing: Iterable[Mapping[str, Any]], ctype: str, reason: str, message: str) -> bool:
    """True when the condition of this type already carries this reason and message."""
    return any(
        c.get("type") == ctype and c.get("reason") == reason and c.get("message") == message[:1000]
        for c in existing
    )


def merge(
    existing: Iterable[Mapping[str, Any]],
    updates: Iterable[tuple[str, bool | None, str, str]],
    *,
    generation: int,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """Applies (type, ok, reason, message) updates to the existing list and returns the new list.

    ``ok`` None is status Unknown.
    """
    by_type = {c["type"]: dict(c) for c in existing if "type" in c}
    for ctype, ok, reason, message in updates:
        status = "Unknown" if ok is None else "True" if ok else "False"
        old = by_type.get(ctype)
        transition = old["lastTransitionTime"] if old and old.get("status") == status else times.rfc3339(now)
        by_type[ctype] = {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message[:1000],
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
    return [by_type[t] for t in sorted(by_type)]
