"""What is at rest for a Kubernetes resource: how many objects under each key_id, how many in plaintext.

Two pure parts of ``keyward audit``, kept out of the CLI so that the operator can count the same way:

* where kube-apiserver keeps a resource in etcd (:func:`resource`): built-in resources under their
  resource name whatever their API group (``deployments.apps`` -> ``/registry/deployments/``, with a few
  historical names such as ``nodes`` -> ``minions``), everything else, custom resources first, under
  ``<group>/<resource>`` (``widgets.example.com`` -> ``/registry/example.com/widgets/``);
* counting raw values by how :func:`keyward.atrest.inspect` classifies them (:class:`Census`), and the
  JSON document ``keyward audit --json`` prints (:func:`document`).

Nothing here reads etcd, decrypts, or keeps a value: a census holds counts only.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from keyward import atrest

#: API groups served by kube-apiserver itself; it stores their resources without the group in the key.
BUILTIN_GROUPS = frozenset(
    {
        "",
        "admissionregistration.k8s.io",
        "apps",
        "autoscaling",
        "batch",
        "certificates.k8s.io",
        "coordination.k8s.io",
        "discovery.k8s.io",
        "events.k8s.io",
        "extensions",
        "flowcontrol.apiserver.k8s.io",
        "internal.apiserver.k8s.io",
        "networking.k8s.io",
        "node.k8s.io",
        "policy",
        "rbac.authorization.k8s.io",
        "resource.k8s.io",
        "scheduling.k8s.io",
        "storage.k8s.io",
        "storagemigration.k8s.io",
    }
)

#: Built-in resources whose key is not their resource name (kube-apiserver's storage factory defaults).
STORAGE_NAMES = {
    ("", "endpoints"): "services/endpoints",
    ("", "nodes"): "minions",
    ("", "replicationcontrollers"): "controllers",
    ("", "services"): "services/specs",
    ("extensions", "ingresses"): "ingress",
    ("networking.k8s.io", "ingresses"): "ingress",
    ("policy", "podsecuritypolicies"): "podsecuritypolicy",
}

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_RESOURCE = re.compile(rf"{_LABEL}(\.{_LABEL})*")


@dataclasses.dataclass(frozen=True)
class Resource:
    name: str  # as the user and EncryptionConfiguration write it: secrets, widgets.example.com
    key_prefix: str  # every object of it is stored under this etcd key prefix


def resource(name: str, etcd_prefix: str = "/registry") -> Resource:
    """Where kube-apiserver started with ``--etcd-prefix=etcd_prefix`` keeps ``name``'s objects.

    Raises ValueError, with the expected form, for a name that cannot be a resource.
    """
    if not _RESOURCE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a resource name: give the plural, lowercase name with its API group as in "
            "an EncryptionConfiguration, e.g. secrets, configmaps, widgets.example.com"
        )
    plural, _, group = name.partition(".")
    # Custom resources (and the few aggregated built-ins, CRDs and APIServices) keep their group.
    builtin = group in BUILTIN_GROUPS
    path = STORAGE_NAMES.get((group, plural), plural) if builtin else f"{group}/{plural}"
    return Resource(name, f"{normalize_prefix(etcd_prefix).rstrip('/')}/{path}/")


def normalize_prefix(etcd_prefix: str) -> str:
    """``registry/`` -> ``/registry``: kube-apiserver joins its ``--etcd-prefix`` to ``/`` the same way."""
    return "/" + etcd_prefix.strip("/")


def _natural(text: str) -> tuple[tuple[int, str], ...]:
    """Sort key that puts secrets/v2/... before secrets/v10/..."""
    return tuple((int(part), "") if part.isdigit() else (0, part) for part in re.split(r"(\d+)", text))


@dataclasses.dataclass
class Census:
    """Counts of one resource's objects by protection; KMS v2 ones by (provider, key_id)."""

    resource: Resource
    by_key_id: collections.Counter[tuple[str, str]] = dataclasses.field(default_factory=collections.Counter)
    other: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    unreadable: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    plaintext: int = 0

    def add(self, found: atrest.AtRest) -> None:
        match found.protection:
            case atrest.Protection.KMS_V2:
                self.by_key_id[(found.provider or "", found.key_id or "")] += 1
            case atrest.Protection.OTHER:
                self.other[found.provider or ""] += 1
            case atrest.Protection.UNREADABLE:
                self.unreadable[found.provider or ""] += 1
            case atrest.Protection.PLAINTEXT:
                self.plaintext += 1

    @property
    def objects(self) -> int:
        return (
            sum(self.by_key_id.values())
            + sum(self.other.values())
            + sum(self.unreadable.values())
            + self.plaintext
        )

    def key_ids(self) -> list[tuple[str, str, int]]:
        """(provider, key_id, objects), in provider then natural key_id order."""
        ordered = sorted(self.by_key_id.items(), key=lambda item: (item[0][0], _natural(item[0][1])))
        return [(provider, key_id, n) for (provider, key_id), n in ordered]

    def not_under(self, key_ids: Collection[str]) -> int:
        """How many objects are not KMS v2 encrypted under one of ``key_ids`` (any provider)."""
        under = sum(n for (_, key_id), n in self.by_key_id.items() if key_id in key_ids)
        return self.objects - under

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.resource.name,
            "keyPrefix": self.resource.key_prefix,
            "objects": self.objects,
            "plaintext": self.plaintext,
            "otherEncryption": sum(self.other.values()),
            "unreadable": sum(self.unreadable.values()),
            "byKeyID": [
                {"provider": provider, "keyID": key_id, "objects": n}
                for provider, key_id, n in self.key_ids()
            ],
            "otherEncryptionByProvider": [
                {"provider": provider, "objects": n} for provider, n in sorted(self.other.items())
            ],
        }


def take(resource: Resource, values: Iterable[bytes]) -> Census:
    """Classify every raw value (nothing is kept but the counts)."""
    census = Census(resource)
    for value in values:
        census.add(atrest.inspect(value))
    return census


def document(etcd_prefix: str, revision: int, endpoint: str, censuses: Sequence[Census]) -> dict[str, Any]:
    """The ``keyward audit --json`` document; its shape is described in the README."""
    return {
        "etcdPrefix": etcd_prefix,
        "etcdEndpoint": endpoint,
        "revision": revision,
        "resources": [c.to_json() for c in censuses],
    }
