"""RotationPolicy: how often keys rotate and how old versions are retired (a frozen model, pure).

Defaults follow the Kubernetes docs (rotate at least every 90 days) and the cloud KMSs (30 days between
scheduling a destruction and carrying it out). They apply to an EncryptionKey without a policy reference,
and the CRD applies the same defaults to fields a RotationPolicy leaves out.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from keyward_operator import durations


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    rotation_period: datetime.timedelta
    minimum_rotation_interval: datetime.timedelta
    decrypt_only_period: datetime.timedelta
    destroy_after_disabled: datetime.timedelta | None
    destruction_window: datetime.timedelta


DEFAULT_SPEC: Mapping[str, str] = {
    "rotationPeriod": "90d",
    "minimumRotationInterval": "1h",
    "decryptOnlyPeriod": "7d",
    "destructionWindow": "30d",
}
BUILT_IN = "(built-in defaults)"


class PolicyError(ValueError):
    """A RotationPolicy that cannot be used; the message names the field."""


def from_spec(name: str, spec: Mapping[str, Any]) -> Policy:
    merged = {**DEFAULT_SPEC, **{k: v for k, v in spec.items() if v not in (None, "")}}
    try:
        policy = Policy(
            name=name,
            rotation_period=durations.parse(str(merged["rotationPeriod"]), field="spec.rotationPeriod"),
            minimum_rotation_interval=durations.parse(
                str(merged["minimumRotationInterval"]), field="spec.minimumRotationInterval"
            ),
            decrypt_only_period=durations.parse(
                str(merged["decryptOnlyPeriod"]), field="spec.decryptOnlyPeriod"
            ),
            destroy_after_disabled=(
                durations.parse(str(merged["destroyAfterDisabled"]), field="spec.destroyAfterDisabled")
                if "destroyAfterDisabled" in merged
                else None
            ),
            destruction_window=durations.parse(
                str(merged["destructionWindow"]), field="spec.destructionWindow"
            ),
        )
    except durations.DurationError as exc:
        raise PolicyError(f"RotationPolicy {name!r}: {exc}") from None
    if policy.rotation_period <= datetime.timedelta(0):
        raise PolicyError(f"RotationPolicy {name!r}: spec.rotationPeriod must be longer than 0s")
    if policy.minimum_rotation_interval > policy.rotation_period:
        minimum = durations.format_duration(policy.minimum_rotation_interval)
        period = durations.format_duration(policy.rotation_period)
        raise PolicyError(
            f"RotationPolicy {name!r}: spec.minimumRotationInterval ({minimum}) is longer than "
            f"spec.rotationPeriod ({period}); make it shorter"
        )
    return policy


def built_in() -> Policy:
    return from_spec(BUILT_IN, {})
