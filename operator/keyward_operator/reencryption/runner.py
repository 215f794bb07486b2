"""Drives the re-encryption of one EncryptionKey, one step at a time, for the key's Kopf daemon.

Each step: decide whether a new run begins (``record.next_start``); while waiting, ask whether every
apiserver has adopted the target (``adoption``); then rewrite (``rewriting``), persisting the run to
``status.reencryption`` after every page. The reconciler reads that record to set the ``Reencrypted`` and
``VersionsRetired`` conditions and to retire old versions; this module never touches the HSM.

The run in memory is the authority while the daemon lives (the watched body lags behind our own writes);
it is loaded from the status once, when the daemon starts, which is how a restarted operator resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from keyward_operator import kubehttp, policies, times
from keyward_operator.reencryption import adoption, objects, record, resourcenames, rewriting

_log = logging.getLogger("keyward.operator")


@dataclasses.dataclass(frozen=True)
class KeyView:
    """What a step needs from the EncryptionKey, read from the (live) body."""

    name: str
    primary_version: int | None
    primary_key_id: str | None
    policy_ref: str | None
    requested: str | None
    status: Mapping[str, Any]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> KeyView:
        meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
        primary = status.get("primaryVersion")
        return cls(
            name=str(meta.get("name")),
            primary_version=None if primary is None else int(primary),
            primary_key_id=status.get("primaryKeyID") or None,
            policy_ref=(spec.get("rotationPolicyRef") or {}).get("name") or None,
            requested=(meta.get("annotations") or {}).get(record.REENCRYPT_ANNOTATION) or None,
            status=status.get("reencryption") or {},
        )


class Notify(Protocol):
    def __call__(self, etype: str, reason: str, message: str) -> None: ...


class TransientError(RuntimeError):
    """The API answered, but with something that passes (429, 5xx): try again shortly."""


class StatusWriter:
    """Merge-patches ``status.reencryption`` of an EncryptionKey (no other status field is touched)."""

    def __init__(self, http: kubehttp.KubeHttp) -> None:
        self.http = http

    def write(self, name: str, record: Mapping[str, Any]) -> None:
        r = self.http.request(
            "PATCH",
            f"/apis/keyward.io/v1alpha1/encryptionkeys/{name}/status",
            body={"status": {"reencryption": record}},
            content_type=kubehttp.MERGE_PATCH,
        )
        if r.status == 429 or r.status >= 500:
            raise TransientError(f"status not written: HTTP {r.status}: {r.message()}")
        if r.status != 200:
            _log.warning(
                "reencrypt.status_not_written",
                extra={"fields": {"key": name, "status": r.status, "why": r.message()}},
            )


class Reencryptor:
    def __init__(
        self,
        name: str,
        *,
        objects_api: objects.Objects,
        probe: adoption.AdoptionProbe,
        writer: StatusWriter,
        notify: Notify,
        load_policy: Callable[[str | None], policies.Policy],
        clock: Callable[[], datetime.datetime],
        settle: float = 2.0,
        retry_after: datetime.timedelta = datetime.timedelta(minutes=10),
        poll: float = 5.0,
        workers: int = 4,
        page_size: int = 500,
    ) -> None:
        self.name = name
        self.objects = objects_api
        self.probe = probe
        self.writer = writer
        self.notify = notify
        self.load_policy = load_policy
        self.clock = clock
        self.settle = settle
        self.retry_after = retry_after
        self.poll = poll
        self.workers = workers
        self.page_size = page_size
        self.run: record.Run | None = None
        self.succeeded: record.Succeeded | None = None
        self.handled: str | None = None
        self._loaded = False

    def step(self, current: Callable[[], KeyView], should_stop: Callable[[], bool]) -> float:
        """One step; returns the seconds to wait before the next.

        An apiserver that cannot be reached (restarting, a network blip) costs a retry after ``poll``
        seconds, never the run: it resumes from its last saved page.
        """
        try:
            return self._step(current, should_stop)
        except (kubehttp.TransportError, TransientError, rewriting.Unavailable) as exc:
            _log.warning(
                "reencrypt.api_unavailable", extra={"fields": {"key": self.name, "why": str(exc)[:300]}}
            )
            return self.poll

    def _step(self, current: Callable[[], KeyView], should_stop: Callable[[], bool]) -> float:
        view = current()
        if not self._loaded:
            self.run = record.Run.from_status(view.status)
            self.succeeded = record.Succeeded.from_status(view.status.get("lastSucceeded"))
            self.handled = view.status.get("lastHandledRequest") or None
            self._loaded = True
            if self.run is not None and self.run.phase in record.ACTIVE:
                fields = {"key": self.name, "phase": self.run.phase, "seen": self.run.total("seen")}
                _log.info("reencrypt.resumed", extra={"fields": fields})
        start = record.next_start(
            now=self.clock(),
            primary_version=view.primary_version,
            primary_key_id=view.primary_key_id,
            run=self.run,
            requested=view.requested,
            handled=self.handled,
            retry_after=self.retry_after,
        )
        if start is not None:
            assert view.primary_version is not None and view.primary_key_id is not None
            self.run = record.new_run(
                start,
                target_version=view.primary_version,
                target_key_id=view.primary_key_id,
                now=self.clock(),
            )
            if start.trigger == "Requested":
                self.handled = start.request
            self._save()
            _log.info("reencrypt.pending", extra={"fields": {"key": self.name, "why": start.message}})
        run = self.run
        if run is None or run.phase not in record.ACTIVE:
            return self.poll
        if run.phase == record.WAITING and not self._begin(run, view):
            return self.poll
        return self._rewrite(run, current, should_stop)

    def _begin(self, run: record.Run, view: KeyView) -> bool:
        """Moves a waiting run to Running once every apiserver has adopted its target."""
        found = self.probe.check(run.target_key_id)
        if not found.adopted:
            message = (
                f"waiting until every apiserver encrypts with version {run.target_version}: {found.message}"
            )
            if run.message != message:
                run.message = message
                self._save()
            return False
        try:
            policy = self.load_policy(view.policy_ref)
        except policies.PolicyError as exc:
            message = f"{exc}; the re-encryption waits for a valid policy"
            if run.message != message:
                run.message = message
                self._save()
            return False
        # The apiserver records the new key_id, then switches its DEK to it: give that a moment.
        time.sleep(self.settle)
        run.phase = record.RUNNING
        run.started_at = self.clock()
        run.resources = [record.ResourceProgress(r) for r in policy.reencrypt_resources]
        run.message = f"{found.message}; rewriting {', '.join(policy.reencrypt_resources)}"
        self._save()
        self.notify(
            "Normal",
            "ReencryptionStarted",
            f"rewriting {', '.join(policy.reencrypt_resources)} under version {run.target_version} "
            f"(at most {policy.reencrypt_rate:g} objects/s): {found.message}",
        )
        return True

    def _rewrite(
        self, run: record.Run, current: Callable[[], KeyView], should_stop: Callable[[], bool]
    ) -> float:
        try:
            rate = self.load_policy(current().policy_ref).reencrypt_rate
        except policies.PolicyError:
            rate = policies.DEFAULT_RATE
        rewriter = rewriting.Rewriter(self.objects, rate=rate, workers=self.workers, page_size=self.page_size)

        def stop() -> bool:
            return should_stop() or current().primary_key_id != run.target_key_id

        try:
            rewriter.run(run, should_stop=stop, on_page=self._save)
        except rewriting.Interrupted:
            return 0.0 if not should_stop() else self.poll
        except objects.ListError as exc:
            if exc.transient:
                raise TransientError(str(exc)) from None
            self._finish(run, f"the re-encryption stopped: {exc}; fix this")
            return self.poll
        except resourcenames.ResourceError as exc:
            self._finish(
                run, f"the re-encryption stopped: {exc}; fix the policy's spec.reencryption.resources"
            )
            return self.poll
        failures = run.total("failures")
        first = f" (first: {run.failed_objects[0]})" if run.failed_objects else ""
        idle = ", ".join(record.untouched(run))
        if failures:
            problem = (
                f"{failures} object(s) could not be rewritten{first} and may still be under an older "
                "version; fix them"
            )
        elif idle:
            problem = (
                f"nothing of {idle} was rewritten after the rotation, so nothing shows it is under version "
                f"{run.target_version}: either an apiserver still encrypts with an older version (its "
                f"/readyz/kms-providers says why), or {idle} is not encrypted with this key (remove it from "
                "spec.reencryption.resources); `keyward audit` shows which; fix this"
            )
        else:
            problem = ""
        self._finish(run, problem)
        return self.poll

    def _finish(self, run: record.Run, problem: str) -> None:
        run.finished_at = self.clock()
        if run.started_at is not None:
            run.duration_seconds = round((run.finished_at - run.started_at).total_seconds(), 2)
        if problem:
            retry = times.rfc3339(run.finished_at + self.retry_after)
            run.phase = record.FAILED
            run.message = f"{problem}, then run `keyward reencrypt {self.name}` (retried at {retry})"
            self.notify("Warning", "ReencryptionFailed", f"{run.message}: {record.summary(run)}")
        else:
            assert run.started_at is not None
            run.phase = record.SUCCEEDED
            run.message = record.summary(run)
            # A later run to the same version (a requested no-op) does not restart the decrypt-only clock.
            if self.succeeded is None or self.succeeded.target_version < run.target_version:
                self.succeeded = record.Succeeded(run.target_version, run.started_at, run.finished_at)
            self.notify(
                "Normal",
                "ReencryptionFinished",
                f"every object is under version {run.target_version} in {run.duration_seconds:.1f}s: "
                f"{run.message}",
            )
        self._save()
        fields = {"key": self.name, "phase": run.phase, **{c: run.total(c) for c in record.COUNTS}}
        _log.info("reencrypt.finished", extra={"fields": fields})

    def _save(self) -> None:
        assert self.run is not None
        entry = {
            **self.run.to_status(),
            "lastSucceeded": None if self.succeeded is None else self.succeeded.to_status(),
            "lastHandledRequest": self.handled,
        }
        self.writer.write(self.name, entry)
