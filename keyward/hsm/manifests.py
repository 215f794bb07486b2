"""The manifest of one key: its versions, their states, and which one is primary (pure, no HSM calls).

The manifest is what makes a set of AES key objects in a token into one named, versioned key. It is kept
in the token itself (as a PKCS#11 data object, see ``store``), so the plugin can start and serve without
the Kubernetes API. Each change produces a new manifest with ``generation`` + 1.

The state machine of a version, enforced by the functions below and nowhere else::

    PendingGeneration --generated--> Enabled <--disable/enable--> Disabled
                                                                    |  ^
                                                   schedule_destroy |  | cancel_destroy
                                                                    v  |
                                                              DestroyScheduled --(at destroyAt)--> Destroyed

- Enabled versions decrypt; the primary (always Enabled) also encrypts.
- The primary can be neither disabled nor scheduled for destruction: promote another version first.
- Disabled is reversible; DestroyScheduled can be cancelled (back to Disabled) until ``destroy_at``;
  Destroyed is terminal: its key material is gone and the version number and key_id are never reused.
- PendingGeneration records the object id of a version *before* the key object is generated, so a
  rotation interrupted by a crash is completed (or its half-made object found) instead of duplicated.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
from typing import Any

from keyward.hsm import errors, keyids


class State(enum.StrEnum):
    PENDING_GENERATION = "PendingGeneration"
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    DESTROY_SCHEDULED = "DestroyScheduled"
    DESTROYED = "Destroyed"


def _ts(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.astimezone(datetime.UTC).isoformat(timespec="seconds")


def _parse_ts(value: Any) -> datetime.datetime | None:
    return None if value is None else datetime.datetime.fromisoformat(str(value))


@dataclasses.dataclass(frozen=True)
class Version:
    """One version of a key."""

    version: int
    object_id: bytes
    key_id: str
    state: State
    created_at: datetime.datetime
    state_changed_at: datetime.datetime
    destroy_at: datetime.datetime | None = None
    destroyed_at: datetime.datetime | None = None
    # The rotation request that made this version (e.g. the operator's "manual:<annotation value>"), so a
    # request replayed after a crash is recognised as done instead of making a second version.
    request_id: str | None = None

    @property
    def can_decrypt(self) -> bool:
        return self.state is State.ENABLED

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "objectId": self.object_id.hex(),
            "keyId": self.key_id,
            "state": self.state.value,
            "createdAt": _ts(self.created_at),
            "stateChangedAt": _ts(self.state_changed_at),
            "destroyAt": _ts(self.destroy_at),
            "destroyedAt": _ts(self.destroyed_at),
            "requestId": self.request_id,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Version:
        created = _parse_ts(raw["createdAt"])
        changed = _parse_ts(raw["stateChangedAt"])
        assert created is not None and changed is not None
        return cls(
            version=int(raw["version"]),
            object_id=bytes.fromhex(raw["objectId"]),
            key_id=str(raw["keyId"]),
            state=State(raw["state"]),
            created_at=created,
            state_changed_at=changed,
            destroy_at=_parse_ts(raw.get("destroyAt")),
            destroyed_at=_parse_ts(raw.get("destroyedAt")),
            request_id=raw.get("requestId"),
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything the store knows about one key."""

    name: str
    generation: int
    primary: int | None
    versions: tuple[Version, ...]
    created_at: datetime.datetime

    @property
    def primary_version(self) -> Version | None:
        return None if self.primary is None else self.version(self.primary)

    def version(self, number: int) -> Version:
        for v in self.versions:
            if v.version == number:
                return v
        raise errors.KeyNotFoundError(f"key {self.name!r} has no version {number}")

    def by_key_id(self, key_id: str) -> Version | None:
        for v in self.versions:
            if v.key_id == key_id:
                return v
        return None

    def made_by(self, request_id: str) -> Version | None:
        """The version a rotation request created, if it did."""
        for v in self.versions:
            if v.request_id == request_id:
                return v
        return None

    @property
    def pending(self) -> Version | None:
        for v in self.versions:
            if v.state is State.PENDING_GENERATION:
                return v
        return None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "kind": "KeywardKeyManifest",
                "formatVersion": 1,
                "name": self.name,
                "generation": self.generation,
                "primary": self.primary,
                "createdAt": _ts(self.created_at),
                "versions": [v.to_json() for v in self.versions],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        if raw.get("kind") != "KeywardKeyManifest" or raw.get("formatVersion") != 1:
            raise errors.StoreError("token holds a key manifest in an unknown format; upgrade Keyward")
        created = _parse_ts(raw["createdAt"])
        assert created is not None
        return cls(
            name=str(raw["name"]),
            generation=int(raw["generation"]),
            primary=None if raw.get("primary") is None else int(raw["primary"]),
            versions=tuple(Version.from_json(v) for v in raw["versions"]),
            created_at=created,
        )


def new(name: str, now: datetime.datetime) -> Manifest:
    return Manifest(name=keyids.validate_name(name), generation=0, primary=None, versions=(), created_at=now)


def _replace(m: Manifest, updated: Version) -> Manifest:
    versions = tuple(updated if v.version == updated.version else v for v in m.versions)
    return dataclasses.replace(m, versions=versions, generation=m.generation + 1)


def _transition(v: Version, allowed_from: tuple[State, ...], to: State, action: str) -> None:
    if v.state not in allowed_from:
        allowed = " or ".join(s.value for s in allowed_from)
        raise errors.VersionStateError(
            f"cannot {action} version {v.version}: it is {v.state.value}, and only a version that is "
            f"{allowed} can become {to.value}"
        )


def begin_version(
    m: Manifest, object_id: bytes, now: datetime.datetime, *, request_id: str | None = None
) -> tuple[Manifest, Version]:
    """Adds the next version in PendingGeneration. Numbers are never reused, even after destruction."""
    if m.pending is not None:
        raise errors.VersionStateError(
            f"key {m.name!r} already has version {m.pending.version} being generated; finish it first"
        )
    number = max((v.version for v in m.versions), default=0) + 1
    v = Version(
        version=number,
        object_id=object_id,
        key_id=keyids.format_key_id(m.name, number, object_id),
        state=State.PENDING_GENERATION,
        created_at=now,
        state_changed_at=now,
        request_id=request_id,
    )
    return dataclasses.replace(m, versions=(*m.versions, v), generation=m.generation + 1), v


def complete_version(m: Manifest, number: int, now: datetime.datetime, *, make_primary: bool) -> Manifest:
    """Marks a generated version Enabled and, for a rotation, makes it primary in the same step."""
    v = m.version(number)
    _transition(v, (State.PENDING_GENERATION,), State.ENABLED, "complete")
    out = _replace(m, dataclasses.replace(v, state=State.ENABLED, state_changed_at=now))
    return dataclasses.replace(out, primary=number) if make_primary else out


def abandon_version(m: Manifest, number: int) -> Manifest:
    """Drops a PendingGeneration version whose key object was never made (its number stays burnt)."""
    v = m.version(number)
    _transition(v, (State.PENDING_GENERATION,), State.DESTROYED, "abandon")
    now = v.created_at
    return _replace(m, dataclasses.replace(v, state=State.DESTROYED, state_changed_at=now, destroyed_at=now))


def set_primary(m: Manifest, number: int) -> Manifest:
    v = m.version(number)
    if v.state is not State.ENABLED:
        raise errors.VersionStateError(
            f"cannot make version {number} primary: it is {v.state.value}; only an Enabled version can be"
        )
    return dataclasses.replace(m, primary=number, generation=m.generation + 1)


def disable(m: Manifest, number: int, now: datetime.datetime) -> Manifest:
    v = m.version(number)
    if m.primary == number:
        raise errors.VersionStateError(
            f"cannot disable version {number}: it is the primary; rotate first (the new version becomes "
            "primary), then disable this one"
        )
    _transition(v, (State.ENABLED,), State.DISABLED, "disable")
    return _replace(m, dataclasses.replace(v, state=State.DISABLED, state_changed_at=now))


def enable(m: Manifest, number: int, now: datetime.datetime) -> Manifest:
    v = m.version(number)
    _transition(v, (State.DISABLED,), State.ENABLED, "enable")
    return _replace(m, dataclasses.replace(v, state=State.ENABLED, state_changed_at=now))


def schedule_destroy(
    m: Manifest, number: int, now: datetime.datetime, destroy_at: datetime.datetime
) -> Manifest:
    v = m.version(number)
    if m.primary == number:
        raise errors.VersionStateError(f"cannot schedule destruction of version {number}: it is the primary")
    _transition(v, (State.DISABLED,), State.DESTROY_SCHEDULED, "schedule destruction of")
    if destroy_at < now:
        raise errors.VersionStateError("destruction time must not be in the past")
    updated = dataclasses.replace(
        v, state=State.DESTROY_SCHEDULED, state_changed_at=now, destroy_at=destroy_at
    )
    return _replace(m, updated)


def cancel_destroy(m: Manifest, number: int, now: datetime.datetime) -> Manifest:
    v = m.version(number)
    _transition(v, (State.DESTROY_SCHEDULED,), State.DISABLED, "cancel destruction of")
    return _replace(m, dataclasses.replace(v, state=State.DISABLED, state_changed_at=now, destroy_at=None))


def mark_destroyed(m: Manifest, number: int, now: datetime.datetime) -> Manifest:
    v = m.version(number)
    _transition(v, (State.DESTROY_SCHEDULED,), State.DESTROYED, "destroy")
    if v.destroy_at is None or now < v.destroy_at:
        raise errors.VersionStateError(
            f"cannot destroy version {number} before its scheduled time {_ts(v.destroy_at)}"
        )
    return _replace(m, dataclasses.replace(v, state=State.DESTROYED, state_changed_at=now, destroyed_at=now))
