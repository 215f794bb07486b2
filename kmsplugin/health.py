"""What Status reports: a real round trip through the HSM with the primary version, cached briefly.

kube-apiserver calls Status at start, every minute, every 10 s while unhealthy, and on /healthz and /readyz
traffic, so the answer is cached (``ok_ttl`` when healthy, ``fail_ttl`` when not) and one check runs at a
time. Each HSM call inside is bounded, so a slow HSM makes Status say so instead of hanging.

Healthy means: the key's manifest could be read, it has a primary version, and 32 random bytes encrypted
with it decrypt to the same bytes. Checking only encryption would report healthy while decrypt is broken.
When the check fails, the last good key_id is still reported, so the apiserver never sees a key_id change
that is only an outage.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable

from keyward.hsm import errors
from keyward.hsm.store import KeyStore
from kmsplugin import keyview, limits

_log = logging.getLogger("keyward.kmsplugin")


@dataclasses.dataclass(frozen=True)
class Health:
    healthz: str  # "ok" or the reason it is not
    key_id: str

    @property
    def ok(self) -> bool:
        return self.healthz == "ok"


class HealthProbe:
    def __init__(
        self,
        store: KeyStore,
        view: keyview.KeyView,
        *,
        ok_ttl: float = 3.0,
        fail_ttl: float = 1.0,
        budget: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.view = view
        self.ok_ttl = ok_ttl
        self.fail_ttl = fail_ttl
        self.budget = budget  # the whole check, well inside the apiserver's 3 s call deadline
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Health | None = None
        self._checked_at = float("-inf")
        self._last_good_key_id = ""

    def check(self) -> Health:
        with self._lock:
            if self._last is not None:
                ttl = self.ok_ttl if self._last.ok else self.fail_ttl
                if self._clock() - self._checked_at < ttl:
                    return self._last
            result = self._probe()
            if result.ok != (self._last.ok if self._last else None) or (
                self._last is not None and result.key_id != self._last.key_id
            ):
                _log.info(
                    "status.changed", extra={"fields": {"healthz": result.healthz, "key_id": result.key_id}}
                )
            self._last, self._checked_at = result, self._clock()
            return result

    def _probe(self) -> Health:
        deadline = self._clock() + self.budget

        def remaining() -> float:
            return max(0.01, deadline - self._clock())

        try:
            primary = self.view.primary()
            limits.check_key_id(primary.key_id)
            sample = secrets.token_bytes(32)
            sealed = self.store.encrypt(primary, sample, timeout=remaining())
            back = self.store.decrypt(primary, sealed, timeout=remaining())
            if not hmac.compare_digest(back, sample):
                return Health("round trip through the HSM returned different bytes", self._last_good_key_id)
        except errors.StoreError as exc:
            return Health(f"hsm: {exc}", self._last_good_key_id)
        except limits.LimitError as exc:
            return Health(f"primary key_id unusable: {exc}", self._last_good_key_id)
        except Exception as exc:  # Status must always answer: an unexpected failure is "not ok", not a crash
            _log.error("status.probe_failed", exc_info=exc)
            return Health(
                f"internal error while checking the HSM ({type(exc).__name__})", self._last_good_key_id
            )
        self.view.report(primary)
        self._last_good_key_id = primary.key_id
        return Health("ok", primary.key_id)
