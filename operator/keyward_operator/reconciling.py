"""One reconciliation of an EncryptionKey: gather (policy, HSM manifest), decide (``decisions``), act (store).

Called by every Kopf handler of the resource (create, update, resume, the timer), so a missed event is
caught on the next tick and a restart picks up where the last run stopped. Reconciliations of one key are
serialised by a lock; different keys run in parallel (the store serialises the PKCS#11 calls themselves).

Nothing here raises for a problem a user can fix: a missing or invalid RotationPolicy, a refused version
transition or an unreachable HSM become conditions and Events, and the HSM is left as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from keyward.hsm import errors
from keyward.hsm.manifests import Manifest
from keyward.hsm.store import KeyStore, utcnow
from keyward_operator import conditions, decisions, policies, retirement, times
from keyward_operator.reencryption import record

_log = logging.getLogger("keyward.operator")
OPERATOR_ACTOR = "operator:keyward"


class PolicySource(Protocol):
    def get(self, name: str) -> Mapping[str, Any] | None:
        """The RotationPolicy's spec, or None when it does not exist."""


@dataclasses.dataclass
class Outcome:
    status: dict[str, Any]
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, reason, message)
    request_condition: tuple[str, bool, str, str] | None = None


class Reconciler:
    def __init__(
        self,
        store: KeyStore,
        policy_source: PolicySource,
        *,
        clock: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        self.store = store
        self.policy_source = policy_source
        self.clock = clock
        self._locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)

    def reconcile(
        self,
        *,
        name: str,
        spec: Mapping[str, Any],
        status: Mapping[str, Any],
        annotations: Mapping[str, str],
        generation: int,
    ) -> Outcome:
        with self._locks[name]:
            return self._reconcile(name, spec, status, annotations, generation)

    def _reconcile(
        self,
        name: str,
        spec: Mapping[str, Any],
        status: Mapping[str, Any],
        annotations: Mapping[str, str],
        generation: int,
    ) -> Outcome:
        now = self.clock()
        outcome = Outcome(status={"observedGeneration": generation})
        old_conditions = status.get("conditions") or []

        def fail(reason: str, message: str) -> Outcome:
            outcome.status["conditions"] = conditions.merge(
                old_conditions, [(conditions.READY, False, reason, message)], generation=generation, now=now
            )
            # The timer meets the same problem on every tick: warn when it appears or changes, not each time.
            if not conditions.unchanged(old_conditions, conditions.READY, reason, message):
                outcome.events.append(("Warning", reason, message))
            return outcome

        # Gather: the policy first, so a bad reference changes nothing in the HSM.
        ref = (spec.get("rotationPolicyRef") or {}).get("name")
        try:
            if ref:
                raw = self.policy_source.get(ref)
                if raw is None:
                    return fail(
                        "RotationPolicyNotFound",
                        f"spec.rotationPolicyRef: RotationPolicy {ref!r} does not exist; create it or change "
                        "the reference (nothing was changed in the HSM)",
                    )
                policy = policies.from_spec(ref, raw)
            else:
                policy = policies.built_in()
        except policies.PolicyError as exc:
            return fail("InvalidRotationPolicy", f"{exc} (nothing was changed in the HSM)")
        outcome.status["rotationPolicy"] = policy.name

        desired = _desired(spec)
        try:
            manifest = self._ensure_key(name, status, outcome)
            manifest = self._rotate_if_due(
                name,
                manifest,
                policy=policy,
                desired=desired,
                annotations=annotations,
                status=status,
                outcome=outcome,
                now=now,
            )
            plan = decisions.version_plan(now=now, manifest=manifest, policy=policy, desired=desired)
            manifest = self._apply(name, manifest, plan=plan, policy=policy, outcome=outcome, now=now)
            raw = status.get("reencryption") or {}
            run = record.Run.from_status(raw)
            retire = retirement.plan(
                now=now,
                manifest=manifest,
                policy=policy,
                desired=desired,
                run=run,
                succeeded=record.Succeeded.from_status(raw.get("lastSucceeded")),
            )
            manifest = self._retire(name, manifest, retire, outcome)
        except errors.StoreError as exc:
            reason = (
                "HsmUnavailable"
                if isinstance(exc, errors.HsmUnavailable | errors.LoginError)
                else "StoreError"
            )
            return fail(reason, str(exc))

        outcome.status.update(_describe(manifest, policy))
        versions_reason = plan.violations[0].reason if plan.violations else "AsRequested"
        versions_message = (
            "; ".join(v.message for v in plan.violations)
            or "every version is in the state spec.versions asks for"
        )
        primary = manifest.primary_version
        ready = (
            conditions.READY,
            True,
            "KeyReady",
            f"version {manifest.primary} is primary ({primary.key_id})" if primary else "no primary",
        )
        updates: list[tuple[str, bool | None, str, str]] = [
            ready,
            (conditions.VERSIONS_RECONCILED, not plan.violations, versions_reason, versions_message),
        ]
        if outcome.request_condition is not None:
            updates.append(outcome.request_condition)
        reencrypted = record.condition(
            run,
            primary_version=manifest.primary,
            primary_key_id=primary.key_id if primary else None,
            name=name,
        )
        updates.append((conditions.REENCRYPTED, *reencrypted))
        updates.append((conditions.VERSIONS_RETIRED, retire.ok, retire.reason, retire.message))
        outcome.status["conditions"] = conditions.merge(
            old_conditions, updates, generation=generation, now=now
        )
        if not conditions.unchanged(
            old_conditions, conditions.VERSIONS_RECONCILED, versions_reason, versions_message
        ):
            for v in plan.violations:
                outcome.events.append(("Warning", v.reason, v.message))
        return outcome

    def _ensure_key(self, name: str, status: Mapping[str, Any], outcome: Outcome) -> Manifest:
        try:
            manifest = self.store.manifest(name)
            if not status.get("primaryVersion") and manifest.primary is not None:
                outcome.events.append(
                    (
                        "Normal",
                        "KeyAdopted",
                        f"adopted the existing HSM key {name!r} (primary version "
                        f"{manifest.primary}); nothing new was generated",
                    )
                )
        except errors.KeyNotFoundError:
            try:
                manifest = self.store.create_key(name, actor=OPERATOR_ACTOR)
                outcome.events.append(
                    ("Normal", "KeyCreated", f"generated version 1 in the HSM ({manifest.version(1).key_id})")
                )
            except errors.KeyExistsError:
                manifest = self.store.manifest(name)
        if manifest.pending is not None:
            pending = manifest.pending
            manifest = self.store.resume(name, actor=OPERATOR_ACTOR)
            outcome.events.append(
                (
                    "Normal",
                    "RotationResumed",
                    f"completed version {pending.version}, interrupted by a restart",
                )
            )
        return manifest

    def _rotate_if_due(
        self,
        name: str,
        manifest: Manifest,
        *,
        policy: policies.Policy,
        desired: Mapping[int, str],
        annotations: Mapping[str, str],
        status: Mapping[str, Any],
        outcome: Outcome,
        now: datetime.datetime,
    ) -> Manifest:
        handled = status.get("lastHandledRotateRequest")
        requested = annotations.get(decisions.ROTATE_ANNOTATION)
        if handled:
            outcome.status["lastHandledRotateRequest"] = handled
        decision = decisions.rotation(
            now=now, manifest=manifest, policy=policy, requested=requested, handled=handled, desired=desired
        )
        if isinstance(decision, decisions.Wait):
            # A condition, not an Event: the timer sees the same wait on every tick until it ends.
            outcome.request_condition = (
                conditions.ROTATION_REQUEST,
                False,
                decision.reason,
                decision.message,
            )
            return manifest
        if decision is None:
            return manifest
        who = decisions.requester(annotations, decision.handled_request)
        actor = f"kubernetes:{who}" if who else OPERATOR_ACTOR
        previous = manifest.primary
        manifest = self.store.rotate(name, actor=actor, request_id=decision.request_id)
        if decision.handled_request is not None:
            outcome.status["lastHandledRotateRequest"] = decision.handled_request
            outcome.request_condition = (
                conditions.ROTATION_REQUEST,
                True,
                "RotationDone",
                f"rotation requested at {decision.handled_request!r} made version {manifest.primary}",
            )
        if manifest.primary != previous:
            primary = manifest.primary_version
            assert primary is not None
            outcome.events.append(
                (
                    "Normal",
                    "Rotated",
                    f"{decision.message}: version {manifest.primary} is "
                    f"primary ({primary.key_id}); version {previous} still decrypts"
                    + (f"; requested by {who}" if who else ""),
                )
            )
        return manifest

    def _retire(
        self, name: str, manifest: Manifest, retire: retirement.Retirement, outcome: Outcome
    ) -> Manifest:
        for number in retire.disable:
            manifest = self.store.disable(name, number, actor=OPERATOR_ACTOR)
            outcome.events.append(
                (
                    "Normal",
                    "VersionRetired",
                    f"version {number} disabled: a finished re-encryption moved every object off it and the "
                    "decryptOnlyPeriod has passed",
                )
            )
        return manifest

    def _apply(
        self,
        name: str,
        manifest: Manifest,
        *,
        plan: decisions.Plan,
        policy: policies.Policy,
        outcome: Outcome,
        now: datetime.datetime,
    ) -> Manifest:
        for step in plan.steps:
            if step.action == "enable":
                manifest = self.store.enable(name, step.version, actor=OPERATOR_ACTOR)
                message = f"version {step.version} decrypts again"
            elif step.action == "disable":
                manifest = self.store.disable(name, step.version, actor=OPERATOR_ACTOR)
                message = f"version {step.version} no longer decrypts"
            elif step.action == "schedule_destroy":
                at = now + policy.destruction_window
                manifest = self.store.schedule_destroy(name, step.version, at, actor=OPERATOR_ACTOR)
                message = (
                    f"version {step.version} will be destroyed at {at.isoformat()}; set its state to "
                    "Disabled in spec.versions to cancel"
                )
            elif step.action == "cancel_destroy":
                manifest = self.store.cancel_destroy(name, step.version, actor=OPERATOR_ACTOR)
                message = f"destruction of version {step.version} cancelled; it is Disabled"
            elif step.action == "destroy":
                manifest = self.store.destroy(name, step.version, actor=OPERATOR_ACTOR)
                message = f"version {step.version}'s key material was deleted from the HSM"
            else:  # pragma: no cover - decisions only emits the actions above
                raise AssertionError(step.action)
            outcome.events.append(("Normal", step.reason, message))
        return manifest


def _desired(spec: Mapping[str, Any]) -> dict[int, str]:
    return {int(v["version"]): str(v["state"]) for v in spec.get("versions") or [] if "version" in v}


def _describe(m: Manifest, policy: policies.Policy) -> dict[str, Any]:
    primary = m.primary_version
    versions = []
    for v in m.versions:
        entry: dict[str, Any] = {
            "version": v.version,
            "keyID": v.key_id,
            "state": v.state.value,
            "createdAt": times.rfc3339_or_none(v.created_at),
            "stateChangedAt": times.rfc3339_or_none(v.state_changed_at),
        }
        if v.destroy_at:
            entry["destroyAt"] = times.rfc3339_or_none(v.destroy_at)
        if v.destroyed_at:
            entry["destroyedAt"] = times.rfc3339_or_none(v.destroyed_at)
        versions.append(entry)
    return {
        "primaryVersion": m.primary,
        "primaryKeyID": None if primary is None else primary.key_id,
        "versions": versions,
        "lastRotationTime": times.rfc3339_or_none(decisions.last_rotation(m)),
        "nextRotationTime": times.rfc3339_or_none(decisions.next_rotation(m, policy)),
    }
