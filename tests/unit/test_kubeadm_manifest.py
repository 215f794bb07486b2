"""The kube-apiserver manifest edit used by the kind recipe and described in docs/install-kubeadm.md."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import yaml

import kubeadm_manifest
import localcluster

# The shape kubeadm writes to /etc/kubernetes/manifests/kube-apiserver.yaml (abridged).
MANIFEST: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "kube-apiserver", "namespace": "kube-system"},
    "spec": {
        "containers": [
            {
                "name": "kube-apiserver",
                "command": [
                    "kube-apiserver",
                    "--advertise-address=10.0.0.10",
                    "--etcd-servers=https://127.0.0.1:2379",
                ],
                "volumeMounts": [{"name": "k8s-certs", "mountPath": "/etc/kubernetes/pki", "readOnly": True}],
            }
        ],
        "volumes": [
            {"name": "k8s-certs", "hostPath": {"path": "/etc/kubernetes/pki", "type": "DirectoryOrCreate"}}
        ],
    },
}


def test_the_flags_and_both_mounts_are_added_once_and_the_rest_is_kept():
    original = copy.deepcopy(MANIFEST)
    once = kubeadm_manifest.add_encryption(MANIFEST)
    assert original == MANIFEST, "the input must not change"
    assert kubeadm_manifest.add_encryption(once) == once, "applying it again must change nothing"
    container = once["spec"]["containers"][0]
    assert container["command"] == [
        *original["spec"]["containers"][0]["command"],
        "--encryption-provider-config=/etc/kubernetes/keyward/encryption-config.yaml",
        "--encryption-provider-config-automatic-reload=true",
    ]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {
        "k8s-certs": "/etc/kubernetes/pki",
        "keyward-encryption-config": "/etc/kubernetes/keyward",
        "keyward-kms-socket": "/var/run/keyward",
    }
    volumes = {v["name"]: v["hostPath"] for v in once["spec"]["volumes"]}
    assert volumes["keyward-kms-socket"] == {"path": "/var/run/keyward", "type": "Directory"}
    assert volumes["keyward-encryption-config"] == {"path": "/etc/kubernetes/keyward", "type": "Directory"}


def test_a_different_earlier_encryption_flag_is_replaced_not_duplicated():
    manifest = copy.deepcopy(MANIFEST)
    manifest["spec"]["containers"][0]["command"].append("--encryption-provider-config=/old/enc.yaml")
    command = kubeadm_manifest.add_encryption(manifest)["spec"]["containers"][0]["command"]
    assert [a for a in command if a.startswith("--encryption-provider-config=")] == [
        "--encryption-provider-config=/etc/kubernetes/keyward/encryption-config.yaml"
    ]


def test_something_else_than_the_apiserver_manifest_is_refused_clearly():
    with pytest.raises(ValueError, match="no container named kube-apiserver"):
        kubeadm_manifest.add_encryption({"kind": "Pod", "spec": {"containers": [{"name": "etcd"}]}})
    cli = subprocess.run(
        [sys.executable, str(localcluster.REPO_ROOT / "hack" / "kubeadm_manifest.py")],
        input="kind: Deployment\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 1 and "expected the kube-apiserver static Pod" in cli.stderr


def test_the_command_line_writes_a_manifest_kubelet_can_read():
    cli = subprocess.run(
        [sys.executable, str(localcluster.REPO_ROOT / "hack" / "kubeadm_manifest.py")],
        input=yaml.safe_dump(MANIFEST),
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(cli.stdout) == kubeadm_manifest.add_encryption(MANIFEST)
