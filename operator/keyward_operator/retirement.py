"""Retirement: which superseded versions the operator disables by itself, and what holds the others (pure).

A superseded version is disabled only when both hold:
- a re-encryption that targeted a later version finished with no failure (``lastSucceeded``): it started
  after every apiserver had adopted its target, so nothing it saw can still be under this version, and
  every write since used the target or a later version;
- the policy's decryptOnlyPeriod has passed since that re-encryption finished: a grace period in which the
  version still decrypts (backups restored, an apiserver with a stale cache) although nothing should need it.
Versions that spec.versions mentions are left to the admin. The destruction schedule (destroyAfterDisabled,
destructionWindow) then applies to the disabled version as to any other.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from keyward.hsm.manifests import Manifest, State, Version
from keyward_operator import policies, times
from keyward_operator.reencryption import record


@dataclasses.dataclass(frozen=True)
class Retirement:
    disable: tuple[int, ...]
    ok: bool  # the VersionsRetired condition: nothing superseded is waiting
    reason: str
    message: str
    wake_at: datetime.datetime | None


def superseded_at(m: Manifest, v: Version) -> datetime.datetime | None:
    """When a later version was first made: the moment ``v`` stopped being the one that encrypts."""
    later = [
        w.created_at for w in m.versions if w.version > v.version and w.state is not State.PENDING_GENERATION
    ]
    return min(later) if later else None


def plan(
    *,
    now: datetime.datetime,
    manifest: Manifest,
    policy: policies.Policy,
    desired: Mapping[int, str],
    run: record.Run | None,
    succeeded: record.Succeeded | None,
) -> Retirement:
    waiting = [
        v
        for v in manifest.versions
        if v.state is State.ENABLED and v.version != manifest.primary and v.version not in desired
    ]
    if not waiting:
        return Retirement((), True, "NothingToRetire", "no superseded version is still enabled", None)
    disable: list[int] = []
    held: list[tuple[str, str]] = []
    wakes: list[datetime.datetime] = []
    for v in waiting:
        since = superseded_at(manifest, v)
        if since is None:
            continue
        if succeeded is None or succeeded.target_version <= v.version:
            held.append(_why_not_reencrypted(v, run))
            continue
        at = succeeded.finished_at + policy.decrypt_only_period
        if now < at:
            wakes.append(at)
            held.append(
                (
                    "DecryptOnlyPeriod",
                    f"version {v.version} holds no data since the re-encryption that finished at "
                    f"{times.rfc3339(succeeded.finished_at)}; it is disabled at {times.rfc3339(at)}, "
                    "when the policy's decryptOnlyPeriod ends",
                )
            )
            continue
        disable.append(v.version)
    if held:
        reason = held[0][0]
        return Retirement(
            tuple(disable), False, reason, "; ".join(m for _, m in held), min(wakes) if wakes else None
        )
    versions = ", ".join(str(n) for n in disable)
    return Retirement(
        tuple(disable),
        True,
        "Retired",
        f"version(s) {versions} disabled: re-encrypted away and past the decryptOnlyPeriod",
        None,
    )


def _why_not_reencrypted(v: Version, run: record.Run | None) -> tuple[str, str]:
    prefix = f"version {v.version} may still protect data"
    if run is None or run.target_version <= v.version:
        return "ReencryptionPending", f"{prefix}: no re-encryption to a later version has run yet"
    if run.phase == record.FAILED:
        return (
            "ReencryptionFailed",
            f"{prefix}: the re-encryption to version {run.target_version} failed: {run.message}",
        )
    if run.phase == record.WAITING:
        return "WaitingForAdoption", f"{prefix}: {run.message}"
    return (
        "ReencryptionInProgress",
        f"{prefix}: the re-encryption to version {run.target_version} is running ({record.summary(run)})",
    )
