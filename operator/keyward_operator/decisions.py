"""Gather, then decide, then act: the deciding, as pure functions over a frozen view of the world.

``rotation`` answers "should this key rotate now?" and ``version_plan`` answers "which version state
changes does the spec ask for, and which of them are refused?". Both take the time as an argument, so
tests give them any clock and nothing here sleeps. The reconciler carries out what they return.

Guards enforced here (the store enforces them again, as its own invariants):
- a manual rotation request waits for the policy's minimumRotationInterval since the last rotation;
- the primary is never disabled or destroyed;
- a version is disabled before it can be scheduled for destruction, and destroyed only at its time;
- a destroyed version never comes back;
- the operator disables a version on its own only through ``retirement``, after a re-encryption proved it
  protects nothing; otherwise disabling is an explicit admin request (spec.versions).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from keyward.hsm.manifests import Manifest, State, Version
from keyward_operator import policies, times

ROTATE_ANNOTATION = "keyward.io/rotate-requested-at"
REQUESTED_BY_ANNOTATION = "keyward.io/rotate-requested-by"


@dataclasses.dataclass(frozen=True)
class Rotate:
    request_id: str  # recorded in the HSM with the new version: a replayed request rotates only once
    reason: str
    message: str
    handled_request: str | None  # the annotation value this rotation answers, if manual


@dataclasses.dataclass(frozen=True)
class Wait:
    reason: str
    message: str
    until: datetime.datetime


def requester(annotations: Mapping[str, str], requested: str | None) -> str | None:
    """Who asked for the rotation ``requested`` names, if the annotations say so for that very request.

    ``keyward rotate`` writes ``<user> for <requested-at value>``; a later plain ``kubectl annotate`` of
    requested-at leaves that line behind, and it must not be credited with the new request.
    """
    value = annotations.get(REQUESTED_BY_ANNOTATION, "")
    suffix = f" for {requested}"
    if requested and value.endswith(suffix) and len(value) > len(suffix):
        return value[: -len(suffix)]
    return None


def last_rotation(m: Manifest) -> datetime.datetime | None:
    primary = m.primary_version
    return None if primary is None else primary.state_changed_at


def next_rotation(m: Manifest, policy: policies.Policy) -> datetime.datetime | None:
    last = last_rotation(m)
    return None if last is None else last + policy.rotation_period


def rotation(
    *,
    now: datetime.datetime,
    manifest: Manifest,
    policy: policies.Policy,
    requested: str | None,
    handled: str | None,
    desired: Mapping[int, str] | None = None,
) -> Rotate | Wait | None:
    last = last_rotation(manifest)
    if last is None:
        return None
    upcoming = max(v.version for v in manifest.versions) + 1
    blocked = (desired or {}).get(upcoming)
    if blocked in ("Disabled", "Destroyed") and (
        requested != handled or now >= last + policy.rotation_period
    ):
        # The new version would be primary, which the spec forbids (and the CRD would refuse to record).
        return Wait(
            "NextVersionBlocked",
            f"spec.versions asks for version {upcoming} to be {blocked}, but a rotation makes it the "
            "primary; remove that entry to let the key rotate",
            now,
        )
    if requested and requested != handled:
        earliest = last + policy.minimum_rotation_interval
        if now < earliest:
            return Wait(
                "RotationRateLimited",
                f"rotation requested at {requested!r} waits until {times.rfc3339(earliest)}: the last "
                f"rotation was at {times.rfc3339(last)} and the policy's minimumRotationInterval has not "
                "passed",
                earliest,
            )
        return Rotate(
            f"manual:{requested}", "RotationRequested", f"rotation requested at {requested!r}", requested
        )
    due = last + policy.rotation_period
    if now >= due:
        return Rotate(
            f"scheduled:{times.rfc3339(due)}",
            "RotationDue",
            f"rotation period elapsed at {times.rfc3339(due)}",
            None,
        )
    return None


@dataclasses.dataclass(frozen=True)
class Step:
    version: int
    action: str  # enable | disable | schedule_destroy | cancel_destroy | destroy
    reason: str  # the Event reason, CamelCase


@dataclasses.dataclass(frozen=True)
class Violation:
    version: int
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    violations: tuple[Violation, ...]
    wake_at: datetime.datetime | None  # the earliest time something becomes due


def version_plan(
    *,
    now: datetime.datetime,
    manifest: Manifest,
    policy: policies.Policy,
    desired: Mapping[int, str],
) -> Plan:
    steps: list[Step] = []
    violations: list[Violation] = []
    wakes: list[datetime.datetime] = []
    known = {v.version for v in manifest.versions}
    for number in sorted(set(desired) - known):
        violations.append(
            Violation(
                number, "UnknownVersion", f"spec.versions: key {manifest.name!r} has no version {number}"
            )
        )
    for v in manifest.versions:
        if v.state is State.PENDING_GENERATION:
            continue
        want = desired.get(v.version)
        if want is None:
            _automatic(v, policy, now, steps, wakes)
        else:
            refused = _requested(v, want, manifest.primary, steps)
            if refused is not None:
                violations.append(refused)
                continue
        if v.state is State.DESTROY_SCHEDULED and want in (None, "Destroyed") and v.destroy_at is not None:
            if now >= v.destroy_at:
                steps.append(Step(v.version, "destroy", "VersionDestroyed"))
            else:
                wakes.append(v.destroy_at)
    return Plan(tuple(steps), tuple(violations), min(wakes) if wakes else None)


_VERBS = {"Disabled": "disable", "Destroyed": "destroy"}


def _requested(v: Version, want: str, primary: int | None, steps: list[Step]) -> Violation | None:
    """Steps towards the state an admin asked for in spec.versions, or why they are refused."""
    n = v.version
    if want in ("Disabled", "Destroyed") and n == primary:
        return Violation(
            n, "PrimaryProtected", f"version {n} is the primary: rotate first, then {_VERBS[want]} it"
        )
    if v.state is State.DESTROYED:
        if want == "Destroyed":
            return None
        return Violation(n, "VersionDestroyed", f"version {n} was destroyed: destruction is permanent")
    if want == "Enabled":
        if v.state is State.DESTROY_SCHEDULED:
            steps.append(Step(n, "cancel_destroy", "DestructionCancelled"))
        if v.state in (State.DISABLED, State.DESTROY_SCHEDULED):
            steps.append(Step(n, "enable", "VersionEnabled"))
    elif want == "Disabled":
        if v.state is State.ENABLED:
            steps.append(Step(n, "disable", "VersionDisabled"))
        elif v.state is State.DESTROY_SCHEDULED:
            steps.append(Step(n, "cancel_destroy", "DestructionCancelled"))
    elif want == "Destroyed":
        if v.state is State.ENABLED:
            return Violation(
                n,
                "DisableBeforeDestroy",
                f"version {n} is Enabled: set it to Disabled first; only a disabled version can be scheduled "
                "for destruction",
            )
        if v.state is State.DISABLED:
            steps.append(Step(n, "schedule_destroy", "DestructionScheduled"))
    return None


def _automatic(
    v: Version,
    policy: policies.Policy,
    now: datetime.datetime,
    steps: list[Step],
    wakes: list[datetime.datetime],
) -> None:
    """What the policy does by itself to versions the spec says nothing about."""
    if v.state is State.DISABLED and policy.destroy_after_disabled is not None:
        at = v.state_changed_at + policy.destroy_after_disabled
        if now >= at:
            steps.append(Step(v.version, "schedule_destroy", "DestructionScheduled"))
        else:
            wakes.append(at)
