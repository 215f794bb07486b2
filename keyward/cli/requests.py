"""``keyward rotate NAME`` and ``keyward reencrypt NAME``: requests to the operator, as annotations.

Each sets ``keyward.io/<what>-requested-at`` to the current time and ``keyward.io/<what>-requested-by`` to
the Kubernetes user the API says we are (SelfSubjectReview), so the operator's audit log names who asked.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from keyward_operator import decisions
from keyward_operator.reencryption import record


def rotate(name: str) -> int:
    return _request(name, decisions.ROTATE_ANNOTATION, decisions.REQUESTED_BY_ANNOTATION, "rotation")


def reencrypt(name: str) -> int:
    return _request(name, record.REENCRYPT_ANNOTATION, record.REENCRYPT_BY_ANNOTATION, "re-encryption")


def _request(name: str, at_annotation: str, by_annotation: str, what: str) -> int:
    try:
        config.load_kube_config()
    except config.ConfigException as exc:
        sys.stderr.write(f"keyward: cannot reach the cluster: {exc}; set KUBECONFIG\n")
        return 2
    who = "unknown"
    try:
        review: Any = client.AuthenticationV1Api().create_self_subject_review(client.V1SelfSubjectReview())
        who = review.status.user_info.username or "unknown"
    except ApiException:
        pass
    now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # "<user> for <request>": the operator credits the user only with this very request.
    annotations = {at_annotation: now, by_annotation: f"{who} for {now}"}
    patch = {"metadata": {"annotations": annotations}}
    try:
        client.CustomObjectsApi().patch_cluster_custom_object(
            "keyward.io", "v1alpha1", "encryptionkeys", name, patch
        )
    except ApiException as exc:
        if exc.status == 404:
            sys.stderr.write(f"keyward: EncryptionKey {name!r} does not exist (kubectl get encryptionkeys)\n")
        else:
            sys.stderr.write(f"keyward: the API refused the {what} request: {exc.status} {exc.reason}\n")
        return 1
    sys.stdout.write(
        f"{what} of {name} requested at {now}; watch it with: kubectl get encryptionkey {name}\n"
    )
    return 0
