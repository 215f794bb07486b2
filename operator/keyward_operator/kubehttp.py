"""Plain HTTP requests to the Kubernetes API with the kubernetes client's credentials and TLS settings.

The generated client has no call for "list any resource as metadata only", "patch with this exact content
type" or "GET /metrics on that apiserver endpoint". This module sends such requests through the client's
own connection pool, so in-cluster tokens (refreshed by the client), kubeconfig certificates and proxies
apply unchanged. Responses come back as (status, parsed JSON or raw bytes); nothing here raises for an
HTTP error status: callers decide what a 404 or a 409 means.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes import client

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_OBJECT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
USER_AGENT = "keyward-operator"


class TransportError(RuntimeError):
    """The request never got an HTTP answer (connection refused, TLS failure, timeout)."""


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    data: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.data or b"null")
        except ValueError:
            return None

    def message(self) -> str:
        """The ``message`` of a Kubernetes Status body, else the start of the body."""
        doc = self.json()
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])[:300]
        return self.data[:200].decode("utf-8", errors="replace")


class KubeHttp:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.config: client.Configuration = self.api_client.configuration

    @property
    def host(self) -> str:
        return str(self.config.host).rstrip("/")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int | None] | None = None,
        body: Any = None,
        content_type: str = JSON,
        accept: str = JSON,
        host: str | None = None,
        timeout: float = 30.0,
    ) -> Response:
        params = {k: str(v) for k, v in (query or {}).items() if v not in (None, "")}
        url = (host or self.host) + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        # The client's own auth settings: the bearer token of a pod's ServiceAccount (refreshed when the
        # kubelet rotates it) or of a kubeconfig; client certificates live in the connection pool.
        settings: Any = self.config.auth_settings()
        for setting in settings.values():
            if setting.get("in") == "header" and setting.get("value"):
                headers["Authorization"] = str(setting["value"])
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            raw = self.api_client.rest_client.pool_manager.request(
                method, url, body=data, headers=headers, timeout=timeout, retries=False
            )
        except urllib3.exceptions.HTTPError as exc:
            raise TransportError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        return Response(int(raw.status), bytes(raw.data))
