"""The operator's reads of the Kubernetes API outside Kopf: RotationPolicies (and the client set-up)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP = "keyward.io"
VERSION = "v1alpha1"


def load_config() -> None:
    """In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class RotationPolicies:
    def __init__(self, api: client.CustomObjectsApi) -> None:
        self.api = api

    def get(self, name: str) -> Mapping[str, Any] | None:
        try:
            obj: Any = self.api.get_cluster_custom_object(GROUP, VERSION, "rotationpolicies", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec: Mapping[str, Any] = obj.get("spec") or {}
        return spec
