"""Kubernetes Events about EncryptionKeys, referenced so that ``kubectl describe encryptionkey`` shows them.

An EncryptionKey is cluster-scoped: its Events live in the ``default`` namespace, but their involvedObject
carries no namespace (kubectl describe searches for exactly that). Kopf's own event helper puts the
Event's namespace into the reference as well, which hides them from describe. Posting is best effort:
a refused Event is logged and never fails a reconciliation.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

_log = logging.getLogger("keyward.operator")
EVENTS_NAMESPACE = "default"
COMPONENT = "keyward-operator"


class EventPoster:
    def __init__(self, api: client.CoreV1Api) -> None:
        self.api = api

    def post(self, body: Mapping[str, Any], *, etype: str, reason: str, message: str) -> None:
        meta = body.get("metadata") or {}
        now = datetime.datetime.now(tz=datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta.get('name', 'encryptionkey')}."),
            involved_object=client.V1ObjectReference(
                api_version=body.get("apiVersion"),
                kind=body.get("kind"),
                name=meta.get("name"),
                uid=meta.get("uid"),
            ),
            type=etype,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=COMPONENT),
        )
        try:
            self.api.create_namespaced_event(EVENTS_NAMESPACE, event)
        except ApiException as exc:
            _log.warning("event.not_posted", extra={"fields": {"reason": reason, "status": exc.status}})
