"""A re-encryption run as the EncryptionKey's status records it, and when to start one (pure).

A run rewrites every object of the configured resources so that each is stored under the key's primary
version. It lives in ``status.reencryption``: the target version, its phase, per-resource counts and the
continue token of the next page, written after every page. That record is what makes a restarted operator
resume where it stopped instead of starting over. ``lastSucceeded`` keeps the newest run that finished with
no failure, the evidence retirement needs, even while a later run is in progress.

Phases: WaitingForAdoption (not every apiserver encrypts with the target yet: a rewrite now would write
the old key again), Running, Succeeded, Failed (some objects could not be rewritten; retried later).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from keyward_operator import times

REENCRYPT_ANNOTATION = "keyward.io/reencrypt-requested-at"
REENCRYPT_BY_ANNOTATION = "keyward.io/reencrypt-requested-by"
MAX_FAILED_OBJECTS = 10

WAITING = "WaitingForAdoption"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
ACTIVE = (WAITING, RUNNING)

COUNTS = ("seen", "rewritten", "unchanged", "conflicts", "deleted", "failures")


@dataclasses.dataclass
class ResourceProgress:
    resource: str
    seen: int = 0
    rewritten: int = 0  # stored again, now under the target version
    unchanged: int = 0  # already under the target version: the apiserver had nothing to write
    conflicts: int = 0  # changed by someone since listed: that write used the target version
    deleted: int = 0  # gone since listed
    failures: int = 0
    continue_token: str | None = None
    relists: int = 0  # times an expired continue token made the list start again
    done: bool = False

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"resource": self.resource, **{c: getattr(self, c) for c in COUNTS}}
        out.update(relists=self.relists, done=self.done, continue_=self.continue_token)
        out["continue"] = out.pop("continue_")
        return out

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> ResourceProgress:
        return cls(
            resource=str(raw["resource"]),
            **{c: int(raw.get(c) or 0) for c in COUNTS},
            continue_token=raw.get("continue") or None,
            relists=int(raw.get("relists") or 0),
            done=bool(raw.get("done")),
        )


@dataclasses.dataclass
class Run:
    target_version: int
    target_key_id: str
    trigger: str  # Rotation | Requested | Retry
    phase: str
    requested_at: datetime.datetime
    request: str | None = None
    started_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    resources: list[ResourceProgress] = dataclasses.field(default_factory=list)
    failed_objects: list[str] = dataclasses.field(default_factory=list)
    message: str = ""
    duration_seconds: float | None = None  # Running to the end, precisely (timestamps are whole seconds)

    def total(self, count: str) -> int:
        return sum(getattr(r, count) for r in self.resources)

    def note_failure(self, text: str) -> None:
        if len(self.failed_objects) < MAX_FAILED_OBJECTS:
            self.failed_objects.append(text[:300])

    def to_status(self) -> dict[str, Any]:
        return {
            "targetVersion": self.target_version,
            "targetKeyID": self.target_key_id,
            "trigger": self.trigger,
            "request": self.request,
            "phase": self.phase,
            "requestedAt": times.rfc3339(self.requested_at),
            "startedAt": times.rfc3339_or_none(self.started_at),
            "finishedAt": times.rfc3339_or_none(self.finished_at),
            "message": self.message,
            "durationSeconds": self.duration_seconds,
            "resources": [r.to_status() for r in self.resources],
            "failedObjects": list(self.failed_objects),
            **{c: self.total(c) for c in COUNTS},
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> Run | None:
        if not raw or not raw.get("targetKeyID") or not raw.get("phase"):
            return None
        return cls(
            target_version=int(raw["targetVersion"]),
            target_key_id=str(raw["targetKeyID"]),
            trigger=str(raw.get("trigger") or "Rotation"),
            phase=str(raw["phase"]),
            requested_at=times.parse(raw.get("requestedAt"))
            or datetime.datetime.fromtimestamp(0, datetime.UTC),
            request=raw.get("request") or None,
            started_at=times.parse(raw.get("startedAt")),
            finished_at=times.parse(raw.get("finishedAt")),
            resources=[ResourceProgress.from_status(r) for r in raw.get("resources") or []],
            failed_objects=[str(f) for f in raw.get("failedObjects") or []],
            message=str(raw.get("message") or ""),
            duration_seconds=None if raw.get("durationSeconds") is None else float(raw["durationSeconds"]),
        )


@dataclasses.dataclass(frozen=True)
class Succeeded:
    """The newest run that finished with no failure: every object is under ``target_version`` or later."""

    target_version: int
    started_at: datetime.datetime
    finished_at: datetime.datetime

    def to_status(self) -> dict[str, Any]:
        return {
            "targetVersion": self.target_version,
            "startedAt": times.rfc3339(self.started_at),
            "finishedAt": times.rfc3339(self.finished_at),
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> Succeeded | None:
        if not raw:
            return None
        started, finished = times.parse(raw.get("startedAt")), times.parse(raw.get("finishedAt"))
        if started is None or finished is None or raw.get("targetVersion") is None:
            return None
        return cls(int(raw["targetVersion"]), started, finished)


@dataclasses.dataclass(frozen=True)
class Start:
    trigger: str
    request: str | None
    message: str


def next_start(
    *,
    now: datetime.datetime,
    primary_version: int | None,
    primary_key_id: str | None,
    run: Run | None,
    requested: str | None,
    handled: str | None,
    retry_after: datetime.timedelta,
) -> Start | None:
    """Whether a new run must begin now. An active run for the current primary simply continues."""
    if primary_version is None or not primary_key_id:
        return None
    if requested and requested != handled:
        return Start("Requested", requested, f"re-encryption requested at {requested!r}")
    if run is None or run.target_key_id != primary_key_id:
        # A key adopted at version 1 has nothing older to move away from; any later version has.
        if run is None and primary_version == 1:
            return None
        return Start("Rotation", None, f"version {primary_version} became primary")
    if run.phase == FAILED and run.finished_at is not None and now >= run.finished_at + retry_after:
        when = times.rfc3339(run.finished_at)
        return Start("Retry", run.request, f"retrying the re-encryption that failed at {when}")
    return None


def new_run(start: Start, *, target_version: int, target_key_id: str, now: datetime.datetime) -> Run:
    return Run(
        target_version=target_version,
        target_key_id=target_key_id,
        trigger=start.trigger,
        phase=WAITING,
        requested_at=now,
        request=start.request,
        message=f"{start.message}; waiting until every apiserver encrypts with {target_key_id}",
    )


_SINGULAR = {"conflicts": "conflict", "failures": "failure"}


def summary(run: Run) -> str:
    def count(name: str) -> str:
        n = run.total(name)
        return f"{n} {_SINGULAR.get(name, name) if n == 1 else name}"

    parts = [count("seen"), count("rewritten")]
    parts += [count(c) for c in ("unchanged", "conflicts", "deleted", "failures") if run.total(c)]
    resources = ", ".join(r.resource for r in run.resources)
    return f"{resources}: " + ", ".join(parts)


def untouched(run: Run) -> list[str]:
    """Resources of which a rotation's run rewrote nothing although it found objects.

    Right after a rotation every object written before it is stale, so each one is rewritten (or changed
    by someone meanwhile). "Unchanged" everywhere means the apiserver found nothing stale: it still
    encrypts with an older version (a failed DEK rotation), or the resource is not encrypted with this key
    at all. Either way the run proves nothing, and must not let a version retire.
    """
    if run.trigger != "Rotation":
        return []
    return [r.resource for r in run.resources if r.unchanged and not r.rewritten]


def condition(
    run: Run | None, *, primary_version: int | None, primary_key_id: str | None, name: str
) -> tuple[bool | None, str, str]:
    """The Reencrypted condition for the current primary: (status, reason, message)."""
    if primary_version is None:
        return None, "NoPrimary", "the key has no primary version yet"
    if run is None and primary_version == 1:
        return (
            None,
            "NotRequested",
            "version 1 is the only version; objects written before encryption was turned on stay as "
            f"they are until `keyward reencrypt {name}` is run",
        )
    if run is None or run.target_key_id != primary_key_id:
        return False, "Pending", f"a re-encryption to version {primary_version} has not started yet"
    by_phase: dict[str, tuple[bool | None, str, str]] = {
        WAITING: (False, WAITING, run.message),
        RUNNING: (
            False,
            "InProgress",
            f"rewriting under version {run.target_version} since "
            f"{times.rfc3339_or_none(run.started_at)}: {summary(run)}",
        ),
        FAILED: (
            False,
            "ReencryptionFailed",
            run.message,
        ),
    }
    return by_phase.get(
        run.phase,
        (
            True,
            "Reencrypted",
            f"every object is under version {run.target_version} or was written since; finished at "
            f"{times.rfc3339_or_none(run.finished_at)}: {summary(run)}",
        ),
    )
