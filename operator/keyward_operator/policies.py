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
from keyward_operator.reencryption import resourcenames

DEFAULT_RATE = 200.0  # objects per second a re-encryption rewrites, unless the policy says otherwise
MAX_RATE = 10000.0


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    rotation_period: datetime.timedelta
    minimum_rotation_interval: datetime.timedelta
    decrypt_only_period: datetime.timedelta
    destroy_after_disabled: datetime.timedelta | None
    destruction_window: datetime.timedelta
    reencrypt_resources: tuple[str, ...] = ("secrets",)
    reencrypt_rate: float = DEFAULT_RATE


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
    policy = dataclasses.replace(policy, **_reencryption(name, spec.get("reencryption") or {}))
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


def _reencryption(name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """spec.reencryption: which resources a re-encryption rewrites, and how fast."""
    resources = raw.get("resources") or ["secrets"]
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise PolicyError(
            f"RotationPolicy {name!r}: spec.reencryption.resources must be a list of resource names"
        )
    for r in resources:
        try:
            resourcenames.split(r)
        except resourcenames.ResourceError as exc:
            raise PolicyError(f"RotationPolicy {name!r}: spec.reencryption.resources: {exc}") from None
    rate = raw.get("objectsPerSecond", DEFAULT_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= MAX_RATE:
        raise PolicyError(
            f"RotationPolicy {name!r}: spec.reencryption.objectsPerSecond must be a number above 0 and "
            f"at most {MAX_RATE:g}, not {rate!r}"
        )
    return {"reencrypt_resources": tuple(dict.fromkeys(resources)), "reencrypt_rate": float(rate)}
