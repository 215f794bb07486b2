"""Kopf handlers for EncryptionKey, registered on a registry built here (no global registry).

Every change (create, update, resume after a restart) and a periodic timer run the same reconciliation,
so scheduled rotations and destructions happen on time even when nothing changes, and an event missed
while the operator was down is caught up. Deletion is guarded by a finalizer whose only job is to say,
in an Event and the audit log, that the HSM material was kept: a Kubernetes delete cannot be cancelled,
so it never destroys key material.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
from collections.abc import Callable
from typing import Any

import kopf

from keyward.hsm import audit
from keyward_operator import events, reconciling
from keyward_operator.reencryption import runner

GROUP = "keyward.io"
VERSION = "v1alpha1"
PLURAL = "encryptionkeys"
FINALIZER = "keyward.io/hsm-key-retained"
_log = logging.getLogger("keyward.operator")


def build_registry(
    reconciler: reconciling.Reconciler,
    poster: events.EventPoster,
    *,
    interval: float,
    reencryptor: Callable[[str, runner.Notify], runner.Reencryptor] | None = None,
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": PLURAL, "registry": registry}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the kubernetes client: in-cluster service account or KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Kopf's bookkeeping goes to annotations under our prefix: the status schema is strict.
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.keyward.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.keyward.io")
        settings.posting.level = logging.WARNING  # our own Events are posted explicitly below
        settings.watching.server_timeout = 300
        # A delete that arrives while the timer's reconcile runs waits for that run to end; Kopf checks
        # only every 60 s by default, which made deleting an EncryptionKey take a minute.
        settings.background.cancellation_polling = 1.0
        # Kopf logs every successful handler and timer run; our reconciler logs what it changes.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    def run(body: kopf.Body, patch: kopf.Patch) -> None:
        outcome = reconciler.reconcile(
            name=body.metadata.name or "",
            spec=body.spec,
            status=body.status,
            annotations=body.metadata.annotations,
            generation=int(body.metadata.get("generation") or 0),
        )
        patch.status.update(outcome.status)
        for etype, reason, message in outcome.events:
            poster.post(body, etype=etype, reason=reason, message=message)
            fields = {"key": body.metadata.name, "type": etype, "reason": reason, "message": message}
            _log.info("key.event", extra={"fields": fields})

    @kopf.on.resume(**resource, id="reconcile-on-resume")
    @kopf.on.create(**resource, id="reconcile-on-create")
    @kopf.on.update(**resource, id="reconcile-on-update")
    def on_change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        run(body, patch)

    @kopf.timer(**resource, id="reconcile-on-timer", interval=interval, initial_delay=interval)
    def on_timer(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if body.metadata.get("deletionTimestamp"):
            return
        run(body, patch)

    # Re-encryptions run in threads of their own: a long run must not take a thread from Kopf's handlers.
    pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="reencrypt")

    @kopf.daemon(**resource, id="reencrypt", cancellation_timeout=60.0)
    async def reencrypt(stopped: kopf.DaemonStopped, body: kopf.Body, **_: Any) -> None:
        if reencryptor is None:
            return
        name = body.metadata.name or ""

        def notify(etype: str, reason: str, message: str) -> None:
            poster.post(body, etype=etype, reason=reason, message=message)
            _log.info(
                "key.event",
                extra={"fields": {"key": name, "type": etype, "reason": reason, "message": message}},
            )

        worker = reencryptor(name, notify)
        loop = asyncio.get_running_loop()
        while not stopped:
            delay = await loop.run_in_executor(
                pool, worker.step, lambda: runner.KeyView.of(body), lambda: bool(stopped)
            )
            if delay > 0:
                await stopped.wait(delay)

    @kopf.on.delete(**resource, id="retain-on-delete")
    def on_delete(body: kopf.Body, **_: Any) -> None:
        name = body.metadata.name or ""
        message = (
            f"EncryptionKey {name} deleted: its HSM key material was kept (nothing is destroyed by a "
            "delete); create the EncryptionKey again to adopt it, or destroy versions first"
        )
        poster.post(body, etype="Normal", reason="KeyRetained", message=message)
        audit.emit(
            "key.retained",
            outcome="success",
            actor=reconciling.OPERATOR_ACTOR,
            key=name,
            at=datetime.datetime.now(tz=datetime.UTC).isoformat(),
        )

    return registry
