"""The objects a re-encryption rewrites: find a resource's API, list it a page at a time, rewrite one object.

A resource is named as in an EncryptionConfiguration: ``secrets``, ``configmaps``, ``widgets.example.com``.
Pages are listed as metadata only (PartialObjectMetadataList), so the operator never holds an object's
data, and at most one page of names at a time. The rewrite is an empty JSON merge patch carrying the
object's uid and resourceVersion: the apiserver writes it back through the current key when it was stored
under another one, refuses it with 409 if anyone changed the object since it was listed (that write already
used the current key), and answers 404 if it was deleted. It never recreates or alters an object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keyward_operator import kubehttp
from keyward_operator.reencryption import resourcenames
from keyward_operator.reencryption.resourcenames import ResourceError


class ContinueExpired(Exception):
    """The list's continue token is too old; ``restart_token`` resumes at the same key if etcd offered one."""

    def __init__(self, restart_token: str | None) -> None:
        super().__init__("continue token expired")
        self.restart_token = restart_token


class ListError(RuntimeError):
    """A page could not be listed (other than an expired token)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """The apiserver is restarting, overloaded or briefly unsure (a 403 while its RBAC cache fills)."""
        return self.status in (403, 429) or self.status >= 500


@dataclasses.dataclass(frozen=True)
class ResourceType:
    name: str  # as configured, e.g. "secrets"
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def base(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def list_path(self) -> str:
        return f"{self.base}/{self.plural}"

    def object_path(self, namespace: str | None, name: str) -> str:
        if self.namespaced and namespace:
            return f"{self.base}/namespaces/{namespace}/{self.plural}/{name}"
        return f"{self.base}/{self.plural}/{name}"


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    namespace: str | None
    name: str
    uid: str
    resource_version: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclasses.dataclass(frozen=True)
class Page:
    items: tuple[ObjectRef, ...]
    continue_token: str | None


class Objects:
    def __init__(self, http: kubehttp.KubeHttp) -> None:
        self.http = http
        self._types: dict[str, ResourceType] = {}

    def resolve(self, resource: str) -> ResourceType:
        if resource in self._types:
            return self._types[resource]
        plural, group = resourcenames.split(resource)
        if group:
            r = self.http.request("GET", f"/apis/{group}")
            if r.status == 404:
                raise ResourceError(f"{resource!r}: the apiserver serves no API group {group!r}")
            if r.status != 200:
                raise ResourceError(f"{resource!r}: discovery of group {group!r} failed: {r.message()}")
            version = str(r.json()["preferredVersion"]["version"])
            path = f"/apis/{group}/{version}"
        else:
            version, path = "v1", "/api/v1"
        r = self.http.request("GET", path)
        if r.status != 200:
            raise ResourceError(f"{resource!r}: discovery of {path} failed: {r.message()}")
        for entry in r.json().get("resources", []):
            if entry.get("name") == plural:
                verbs = set(entry.get("verbs") or [])
                if not {"list", "patch"} <= verbs:
                    raise ResourceError(
                        f"{resource!r} cannot be listed and patched, so it cannot be rewritten"
                    )
                rtype = ResourceType(
                    resource, group, version, plural, str(entry["kind"]), bool(entry.get("namespaced"))
                )
                self._types[resource] = rtype
                return rtype
        raise ResourceError(f"{resource!r}: {path} serves no resource {plural!r}")

    def list_page(self, rtype: ResourceType, *, limit: int, continue_token: str | None) -> Page:
        r = self.http.request(
            "GET",
            rtype.list_path(),
            query={"limit": limit, "continue": continue_token},
            accept=kubehttp.METADATA_LIST,
            timeout=60.0,
        )
        if r.status == 410:
            doc = r.json()
            token = (doc.get("metadata") or {}).get("continue") if isinstance(doc, dict) else None
            raise ContinueExpired(token or None)
        if r.status != 200:
            raise ListError(f"listing {rtype.name} failed: HTTP {r.status}: {r.message()}", r.status)
        doc = r.json()
        items = tuple(_ref(item.get("metadata") or {}) for item in doc.get("items") or [])
        return Page(items, (doc.get("metadata") or {}).get("continue") or None)

    def rewrite(self, rtype: ResourceType, ref: ObjectRef) -> kubehttp.Response:
        """The no-op write; 200 with the object's new resourceVersion, 409, 404, or another answer."""
        patch = {"metadata": {"uid": ref.uid, "resourceVersion": ref.resource_version}}
        return self.http.request(
            "PATCH",
            rtype.object_path(ref.namespace, ref.name),
            body=patch,
            content_type=kubehttp.MERGE_PATCH,
            accept=kubehttp.METADATA_OBJECT,  # the answer carries no data either
            query={"fieldManager": "keyward-reencrypt"},
        )


def _ref(meta: dict[str, Any]) -> ObjectRef:
    return ObjectRef(
        namespace=meta.get("namespace") or None,
        name=str(meta.get("name")),
        uid=str(meta.get("uid")),
        resource_version=str(meta.get("resourceVersion")),
    )


def new_resource_version(response: kubehttp.Response) -> str | None:
    doc = response.json()
    if isinstance(doc, dict):
        rv = (doc.get("metadata") or {}).get("resourceVersion")
        return None if rv is None else str(rv)
    return None
