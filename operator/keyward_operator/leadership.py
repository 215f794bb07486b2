"""Leader election on a coordination.k8s.io Lease: of several operator replicas, exactly one acts.

The leader renews the Lease every ``renew_every`` seconds. A replica takes over only when the Lease has not
been renewed for ``lease_seconds``; every write carries the resourceVersion it read, so two candidates
cannot both win. A leader that cannot renew within the lease time stops itself (the process exits and is
restarted), since by then another replica may already act: better idle than two writers.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

_log = logging.getLogger("keyward.operator.leadership")


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


class LeaderElector:
    def __init__(
        self,
        api: client.CoordinationV1Api,
        *,
        namespace: str,
        identity: str,
        name: str = "keyward-operator",
        lease_seconds: int = 15,
        renew_every: float = 5.0,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.identity = identity
        self.name = name
        self.lease_seconds = lease_seconds
        self.renew_every = renew_every
        self._last_beat = time.monotonic()

    def _beat(self) -> None:
        self._last_beat = time.monotonic()

    def healthy(self) -> tuple[bool, str]:
        """Whether the acquire or renew loop made an attempt recently (a hung API call makes it stale)."""
        age = time.monotonic() - self._last_beat
        if age > self.lease_seconds + 2 * self.renew_every:
            return False, f"the leader-election loop has not run for {age:.0f}s"
        return True, "ok"

    def try_acquire(self) -> bool:
        now = _now()
        try:
            lease: Any = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_seconds,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        holder = spec.holder_identity
        renewed = spec.renew_time or spec.acquire_time
        expired = renewed is None or now > renewed + datetime.timedelta(
            seconds=spec.lease_duration_seconds or self.lease_seconds
        )
        if holder not in (None, "", self.identity) and not expired:
            return False
        if holder != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.lease_seconds
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)  # carries resourceVersion
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Blocks until this replica leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            self._beat()
            try:
                if self.try_acquire():
                    _log.info("leadership.acquired", extra={"fields": {"identity": self.identity}})
                    return True
            except ApiException as exc:
                _log.warning("leadership.error", extra={"fields": {"status": exc.status}})
            except urllib3.exceptions.HTTPError as exc:  # apiserver unreachable (restarting)
                _log.warning("leadership.error", extra={"fields": {"why": type(exc).__name__}})
            if not announced:
                _log.info(
                    "leadership.waiting", extra={"fields": {"identity": self.identity, "lease": self.name}}
                )
                announced = True
            stop.wait(self.renew_every)
        return False

    def keep(self, stop: threading.Event, on_lost: Callable[[], None]) -> threading.Thread:
        """Renews in the background; calls ``on_lost`` once if the lease cannot be held."""

        def loop() -> None:
            last_ok = _now()
            while not stop.wait(self.renew_every):
                self._beat()
                try:
                    if self.try_acquire():
                        last_ok = _now()
                        continue
                    _log.error("leadership.lost", extra={"fields": {"identity": self.identity}})
                    on_lost()
                    return
                except ApiException as exc:
                    _log.warning("leadership.renew_failed", extra={"fields": {"status": exc.status}})
                except urllib3.exceptions.HTTPError as exc:
                    # An unreachable apiserver is a failed renewal, not the end of the thread: a dead
                    # renewal thread kept acting as leader while another replica took the Lease.
                    _log.warning("leadership.renew_failed", extra={"fields": {"why": type(exc).__name__}})
                if _now() - last_ok > datetime.timedelta(seconds=self.lease_seconds - self.renew_every):
                    _log.error("leadership.expired", extra={"fields": {"identity": self.identity}})
                    on_lost()
                    return

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        try:
            lease: Any = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException:
            pass
