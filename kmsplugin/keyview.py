"""The plugin's view of the key it serves: which version is primary and which key_ids decrypt.

The operator or an admin changes the key's manifest in the token; the plugin re-reads it at most every
``refresh_after`` seconds, so a rotation shows in Status within seconds and without a restart. When a
refresh fails (the HSM blips), the last good manifest stays in use, so a blip never looks like a rotation
or makes key_ids unknown. An unknown key_id triggers one immediate refresh (rate-limited), since it may be
a version created a moment ago.

Encrypt uses the version that Status last reported, not the freshest primary: the apiserver checks that
Encrypt answers with the key_id it just saw in Status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from keyward.hsm import errors
from keyward.hsm.manifests import Manifest, State, Version
from keyward.hsm.store import KeyStore


class KeyView:
    def __init__(
        self,
        store: KeyStore,
        name: str,
        *,
        refresh_after: float = 2.0,
        read_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.name = name
        self.refresh_after = refresh_after
        self.read_timeout = read_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._read_at = float("-inf")
        self._forced_at = float("-inf")
        self._reported: Version | None = None

    def current(self) -> Manifest:
        """The manifest, re-read if older than ``refresh_after``; the last good one if the read fails."""
        with self._lock:
            if self._clock() - self._read_at < self.refresh_after and self._manifest is not None:
                return self._manifest
        return self._refresh()

    def _refresh(self) -> Manifest:
        try:
            fresh = self.store.manifest(self.name, timeout=self.read_timeout)
        except errors.StoreError:
            with self._lock:
                if self._manifest is None:
                    raise
                return self._manifest
        with self._lock:
            self._manifest, self._read_at = fresh, self._clock()
            return fresh

    def primary(self) -> Version:
        m = self.current()
        v = m.primary_version
        if v is None:
            raise errors.KeyNotFoundError(f"key {self.name!r} has no primary version yet")
        return v

    def report(self, version: Version) -> None:
        """Records the version Status told the apiserver about; Encrypt will use it."""
        with self._lock:
            self._reported = version

    def for_encrypt(self) -> Version:
        with self._lock:
            reported = self._reported
        if reported is not None:
            # The reported version may have changed state since (it cannot while primary): recheck it.
            latest = self.current().by_key_id(reported.key_id)
            if latest is not None and latest.state is State.ENABLED:
                return latest
            # The reported version was superseded and then disabled before the next Status: encrypting
            # under the current primary beats failing until then.
        return self.primary()

    def for_decrypt(self, key_id: str) -> Version:
        """The version named by key_id, or KeyNotFoundError when this key has no such version."""
        version = self.current().by_key_id(key_id)
        if version is None:
            with self._lock:
                may_force = self._clock() - self._forced_at >= 1.0
                if may_force:
                    self._forced_at = self._clock()
            if may_force:
                version = self._refresh().by_key_id(key_id)
        if version is None:
            raise errors.KeyNotFoundError(f"unknown key_id {key_id!r}: key {self.name!r} has no such version")
        return version
