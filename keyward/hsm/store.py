"""KeyStore: named, versioned AES-256 keys that live and are used inside a PKCS#11 token.

Layout in the token:

- one AES-256 secret-key object per version: sensitive, not extractable, usable only to encrypt and
  decrypt, ``CKA_ID`` = 12 random bytes (the random part of the key_id), label ``keyward/<name>/v<N>``;
- one data object per key holding its manifest (versions, states, primary; see ``manifests``), with
  ``CKA_APPLICATION`` = ``keyward-manifest`` and ``CKA_LABEL`` = the key name. Data objects cannot be
  modified, so each change writes the next generation and then removes older ones; readers take the
  highest generation, so a crash between the two steps loses nothing.

Writers are serialised by a host-local lock file plus a generation check (compare-and-swap on
``generation``); on a cluster the operator's leader election makes it the only writer. Readers (the
plugin) never lock.

Multi-step changes are ordered so that a crash at any point leaves a state the next call completes: a
rotation first records the new version as PendingGeneration (with its CKA_ID), then generates the key
object, then promotes it. Resuming finds the object by its CKA_ID, so no version is made twice.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import logging
import os
import pathlib
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from keyward.hsm import audit, envelope, errors, failpoints, keyids, manifests, worker
from keyward.hsm.manifests import Manifest, State, Version

MANIFEST_APPLICATION = "keyward-manifest"
MAX_PLAINTEXT = 512  # the apiserver sends a 32-byte seed; anything much larger is a caller bug

_log = logging.getLogger("keyward.hsm")
Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0)


class KeyStore:
    """Key lifecycle and cryptography over one token. Thread-safe: all PKCS#11 work goes to the worker."""

    def __init__(
        self,
        hsm: worker.HsmWorker,
        *,
        clock: Clock = utcnow,
        lock_path: pathlib.Path | None = None,
        crypto_timeout: float = 2.5,
    ) -> None:
        self.hsm = hsm
        self.clock = clock
        self.crypto_timeout = crypto_timeout
        self._lock_path = lock_path or _default_lock_path(hsm.config.module_path, hsm.config.token_label)
        self._thread_lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------------

    def manifests(self, *, timeout: float | None = None) -> dict[str, Manifest]:
        """Every key in the token, by name."""
        current, _ = self.hsm.run(_read_manifests, timeout=timeout)
        return current

    def manifest(self, name: str, *, timeout: float | None = None) -> Manifest:
        found = self._read(name, timeout=timeout)
        if found is None:
            raise errors.KeyNotFoundError(
                f"key {name!r} does not exist in token {self.hsm.config.token_label!r}; "
                f"create it with `keyward keys create {name}`"
            )
        return found

    # -- lifecycle ---------------------------------------------------------------------------------------

    def create_key(self, name: str, *, actor: str) -> Manifest:
        """Creates a key with version 1 as primary. Completes an earlier create that crashed half-way."""
        keyids.validate_name(name)
        with self._audited("key.create", actor=actor, key=name) as note, self._writing():
            existing = self._read(name)
            if existing is not None and existing.primary is not None:
                raise errors.KeyExistsError(
                    f"key {name!r} already exists (primary version {existing.primary})"
                )
            m = self._add_version(existing or manifests.new(name, self.clock()))
            note(version=m.primary, key_id=_primary_key_id(m))
            return m

    def rotate(self, name: str, *, actor: str, request_id: str | None = None) -> Manifest:
        """Generates the next version and makes it primary; the previous ones keep decrypting.

        With a ``request_id``, the rotation happens at most once per id: a request that already made its
        version returns the key unchanged (or finishes that version, if a crash interrupted it). Without
        one, a rotation left half-done by a crash is finished and counts as the rotation asked for.
        """
        with (
            self._audited("key.rotate", actor=actor, key=name, request_id=request_id) as note,
            self._writing(),
        ):
            m = self.manifest(name)
            previous = m.primary
            made = None if request_id is None else m.made_by(request_id)
            if made is not None:
                if made.state is State.PENDING_GENERATION:
                    m = self._add_version(m)
                note(version=made.version, key_id=made.key_id, already_done=True)
                return m
            if m.pending is not None:
                m = self._add_version(m)  # finish the interrupted rotation first
                if request_id is None:
                    note(
                        version=m.primary, key_id=_primary_key_id(m), previous_version=previous, resumed=True
                    )
                    return m
            m = self._add_version(m, request_id=request_id)
            note(version=m.primary, key_id=_primary_key_id(m), previous_version=previous)
            return m

    def resume(self, name: str, *, actor: str) -> Manifest:
        """Completes a version left in PendingGeneration by a crash, if any (no-op otherwise)."""
        with self._writing():
            m = self.manifest(name)
            if m.pending is None:
                return m
            with self._audited("key.resume", actor=actor, key=name) as note:
                m = self._add_version(m)
                note(version=m.primary, key_id=_primary_key_id(m))
                return m

    def transition(
        self,
        name: str,
        version: int,
        change: Callable[[Manifest], Manifest],
        *,
        event: str,
        actor: str,
    ) -> Manifest:
        """Applies a pure state change from ``manifests`` (disable, enable, schedule/cancel destruction)."""
        with self._audited(event, actor=actor, key=name, version=version) as note, self._writing():
            m = self.manifest(name)
            updated = change(m)
            self._write(m, updated)
            note(state=updated.version(version).state.value)
            return updated

    def disable(self, name: str, version: int, *, actor: str) -> Manifest:
        now = self.clock()
        return self.transition(
            name, version, lambda m: manifests.disable(m, version, now), event="version.disable", actor=actor
        )

    def enable(self, name: str, version: int, *, actor: str) -> Manifest:
        now = self.clock()
        return self.transition(
            name, version, lambda m: manifests.enable(m, version, now), event="version.enable", actor=actor
        )

    def schedule_destroy(
        self, name: str, version: int, destroy_at: datetime.datetime, *, actor: str
    ) -> Manifest:
        now = self.clock()
        return self.transition(
            name,
            version,
            lambda m: manifests.schedule_destroy(m, version, now, destroy_at),
            event="version.schedule_destroy",
            actor=actor,
        )

    def cancel_destroy(self, name: str, version: int, *, actor: str) -> Manifest:
        now = self.clock()
        return self.transition(
            name,
            version,
            lambda m: manifests.cancel_destroy(m, version, now),
            event="version.cancel_destroy",
            actor=actor,
        )

    def destroy(self, name: str, version: int, *, actor: str) -> Manifest:
        """Deletes a version's key material once its scheduled time has come. Irreversible."""
        with self._audited("version.destroy", actor=actor, key=name, version=version), self._writing():
            m = self.manifest(name)
            updated = manifests.mark_destroyed(m, version, self.clock())  # checks state and time first
            object_id = m.version(version).object_id

            def destroy_object(session: Any) -> None:
                for obj in session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: object_id}
                ):
                    obj.destroy()
                self.hsm.forget_key(object_id)

            self.hsm.run(destroy_object)
            self._write(m, updated)
            return updated

    # -- cryptography ------------------------------------------------------------------------------------

    def encrypt(self, version: Version, plaintext: bytes, *, timeout: float | None = None) -> bytes:
        """Seals plaintext under one Enabled version; the caller chose the version (the primary)."""
        if not plaintext:
            raise ValueError("plaintext is empty")
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"plaintext is {len(plaintext)} bytes; at most {MAX_PLAINTEXT} are accepted")
        if version.state is not State.ENABLED:
            raise errors.VersionStateError(
                f"version {version.version} is {version.state.value}; only an Enabled version encrypts"
            )
        nonce = secrets.token_bytes(envelope.NONCE_LEN)
        head = envelope.header(version.key_id, nonce)
        params = GCMParams(nonce, envelope.aad(head, version.key_id), envelope.GCM_TAG_LEN * 8)

        def seal(session: Any) -> bytes:
            key = self.hsm.key(session, version.object_id)
            return bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params))

        return head + self.hsm.run(seal, timeout=self.crypto_timeout if timeout is None else timeout)

    def decrypt(self, version: Version, ciphertext: bytes, *, timeout: float | None = None) -> bytes:
        """Opens a ciphertext made by ``encrypt`` under this version, or raises a CiphertextError."""
        sealed = envelope.parse(ciphertext)
        envelope.check_key_id(sealed, version.key_id)
        if not version.can_decrypt:
            raise errors.VersionStateError(
                f"version {version.version} ({version.key_id}) is {version.state.value}: it no longer "
                "decrypts. Re-enable it if data still needs it"
            )
        params = GCMParams(
            sealed.nonce, envelope.aad(sealed.header, version.key_id), envelope.GCM_TAG_LEN * 8
        )

        def open_(session: Any) -> bytes:
            key = self.hsm.key(session, version.object_id)
            try:
                return bytes(key.decrypt(sealed.body, mechanism=Mechanism.AES_GCM, mechanism_param=params))
            except (p11e.GeneralError, p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange) as exc:
                # SoftHSM2 reports a failed GCM tag check as a generic error (pkcs11-notes.md).
                raise errors.AuthenticationFailedError(
                    "ciphertext failed authentication: it was altered, truncated or corrupted"
                ) from exc

        return self.hsm.run(open_, timeout=self.crypto_timeout if timeout is None else timeout)

    # -- internals ---------------------------------------------------------------------------------------

    def _read(self, name: str, *, timeout: float | None = None) -> Manifest | None:
        return self.hsm.run(lambda s: _read_manifests(s, name)[0].get(name), timeout=timeout)

    def _add_version(self, m: Manifest, *, request_id: str | None = None) -> Manifest:
        """Pending -> generated -> Enabled and primary, resuming from wherever a crash left it."""
        pending = m.pending
        if pending is None:
            before = m
            object_id = secrets.token_bytes(keyids.OBJECT_ID_BYTES)
            m, pending = manifests.begin_version(m, object_id, self.clock(), request_id=request_id)
            self._write(before, m)
        version = pending

        def generate(session: Any) -> None:
            found = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: version.object_id}
                )
            )
            if found:
                return  # generated before a crash; do not make a second one
            session.generate_key(
                KeyType.AES,
                256,
                id=version.object_id,
                label=keyids.object_label(m.name, version.version),
                store=True,
                template=worker.SECRET_KEY_TEMPLATE,
            )

        self.hsm.run(generate)
        failpoints.hit("store.after-generate")
        promoted = manifests.complete_version(m, version.version, self.clock(), make_primary=True)
        self._write(m, promoted)
        return promoted

    def _write(self, previous: Manifest, updated: Manifest) -> None:
        """Stores ``updated`` if the token still holds ``previous`` (compare-and-swap on generation).

        A key that does not exist yet has generation 0 (``manifests.new``).
        """
        expected = previous.generation

        def write(session: Any) -> None:
            current, stale = _read_manifests(session, updated.name)
            have = current.get(updated.name)
            if (0 if have is None else have.generation) != expected:
                raise errors.StoreConflictError(
                    f"key {updated.name!r} was changed by another writer; read it again and retry"
                )
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                    Attribute.APPLICATION: MANIFEST_APPLICATION,
                    Attribute.LABEL: updated.name,
                    Attribute.VALUE: updated.to_bytes(),
                }
            )
            # Only after the new generation is stored: remove the ones it supersedes.
            for obj in stale.get(updated.name, []):
                obj.destroy()

        self.hsm.run(write)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Serialises writers: threads of this process, then processes on this host."""
        with self._thread_lock:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _audited(self, event: str, *, actor: str, **fields: Any) -> Iterator[Callable[..., None]]:
        extra: dict[str, Any] = dict(fields)
        started = time.monotonic()

        def note(**more: Any) -> None:
            extra.update(more)

        try:
            yield note
        except errors.StoreError as exc:
            audit.emit(event, outcome=type(exc).__name__, actor=actor, reason=str(exc), **extra)
            raise
        except Exception as exc:
            audit.emit(event, outcome=type(exc).__name__, actor=actor, **extra)
            raise
        audit.emit(event, outcome="success", actor=actor, duration_ms=_ms(started), **extra)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


def _primary_key_id(m: Manifest) -> str | None:
    v = m.primary_version
    return None if v is None else v.key_id


def _read_manifests(
    session: Any, name: str | None = None
) -> tuple[dict[str, Manifest], dict[str, list[Any]]]:
    """Returns the newest manifest per key, and the superseded data objects per key."""
    template: dict[Any, Any] = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.APPLICATION: MANIFEST_APPLICATION,
    }
    if name is not None:
        template[Attribute.LABEL] = name
    candidates: dict[str, list[tuple[Manifest, bytes, Any]]] = {}
    for obj in session.get_objects(template):
        raw = bytes(obj[Attribute.VALUE])
        try:
            m = Manifest.from_bytes(raw)
        except (ValueError, KeyError) as exc:
            raise errors.StoreError(f"a key manifest in the token is unreadable ({exc})") from None
        candidates.setdefault(m.name, []).append((m, hashlib.sha256(raw).digest(), obj))
    current: dict[str, Manifest] = {}
    stale: dict[str, list[Any]] = {}
    for key, found in candidates.items():
        # Highest generation wins; the digest only makes a (never expected) tie deterministic.
        found.sort(key=lambda item: (-item[0].generation, item[1]))
        current[key] = found[0][0]
        stale[key] = [obj for _, _, obj in found]
    return current, stale


def _default_lock_path(module_path: pathlib.Path, token_label: str) -> pathlib.Path:
    env = os.environ.get("KEYWARD_STORE_LOCK")
    if env:
        return pathlib.Path(env)
    # realpath: the same module reached through a symlink must get the same lock.
    digest = hashlib.sha256(f"{os.path.realpath(module_path)}\0{token_label}".encode()).hexdigest()[:16]
    return pathlib.Path(tempfile.gettempdir()) / f"keyward-store-{digest}.lock"
