"""Where kube-apiserver keeps a resource in etcd, and counting raw values by protection and key_id.

The key prefixes of built-in resources were read off a real kube-apiserver's etcd; tests/e2e/test_audit.py
checks a few of them again against the running one.
"""

from __future__ import annotations

import pytest

from keyward import census
from keyward.wire import envelope_pb2


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("secrets", "/registry/secrets/"),
        ("configmaps", "/registry/configmaps/"),
        ("widgets.example.com", "/registry/example.com/widgets/"),
        ("encryptionkeys.keyward.io", "/registry/keyward.io/encryptionkeys/"),
        ("deployments.apps", "/registry/deployments/"),
        ("leases.coordination.k8s.io", "/registry/leases/"),
        ("services", "/registry/services/specs/"),
        ("endpoints", "/registry/services/endpoints/"),
        ("nodes", "/registry/minions/"),
        ("replicationcontrollers", "/registry/controllers/"),
        ("ingresses.networking.k8s.io", "/registry/ingress/"),
        (
            "customresourcedefinitions.apiextensions.k8s.io",
            "/registry/apiextensions.k8s.io/customresourcedefinitions/",
        ),
        ("apiservices.apiregistration.k8s.io", "/registry/apiregistration.k8s.io/apiservices/"),
    ],
)
def test_resources_map_to_the_key_prefix_kube_apiserver_uses(name: str, prefix: str):
    assert census.resource(name) == census.Resource(name, prefix)


@pytest.mark.parametrize("etcd_prefix", ["/kubernetes.io", "kubernetes.io", "/kubernetes.io/"])
def test_the_etcd_prefix_is_joined_like_kube_apiserver_does(etcd_prefix: str):
    assert census.resource("secrets", etcd_prefix).key_prefix == "/kubernetes.io/secrets/"
    assert census.normalize_prefix(etcd_prefix) == "/kubernetes.io"


def test_a_root_etcd_prefix_gives_single_slashes():
    assert census.resource("widgets.example.com", "/").key_prefix == "/example.com/widgets/"


@pytest.mark.parametrize(
    "name", ["Secrets", "", "*.apps", "secrets.", "secrets/x", "secrets apps", "-secrets"]
)
def test_what_cannot_be_a_resource_is_refused_with_the_expected_form(name: str):
    with pytest.raises(ValueError, match=r"plural, lowercase name with its API group"):
        census.resource(name)


def kms(key_id: str, provider: str = "keyward") -> bytes:
    obj = envelope_pb2.EncryptedObject(encryptedData=b"\x00" * 40, keyID=key_id, encryptedDEKSource=b"d" * 32)
    return f"k8s:enc:kms:v2:{provider}:".encode() + obj.SerializeToString()


V1, V2, V10 = "secrets/v1/" + "a" * 24, "secrets/v2/" + "b" * 24, "secrets/v10/" + "c" * 24


def sample() -> census.Census:
    values = [
        kms(V2),
        kms(V1),
        kms(V2),
        kms(V10),
        kms(V1, provider="other-kms"),
        b"k8s:enc:aescbc:v1:key1:" + b"\x01" * 48,
        b"k8s:enc:secretbox:v1:key1:" + b"\x01" * 48,
        b"k8s:enc:aescbc:v1:key2:" + b"\x01" * 48,
        b"k8s:enc:kms:v2:keyward:\xff\xff\xff",
        b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret",
        b'{"kind":"ConfigMap"}',
    ]
    return census.take(census.resource("secrets"), values)


def test_values_are_counted_by_provider_and_key_id_in_natural_order():
    c = sample()
    assert c.key_ids() == [("keyward", V1, 1), ("keyward", V2, 2), ("keyward", V10, 1), ("other-kms", V1, 1)]
    assert (c.plaintext, sum(c.other.values()), sum(c.unreadable.values()), c.objects) == (2, 3, 1, 11)


def test_not_under_counts_everything_but_the_expected_key_ids():
    c = sample()
    assert c.not_under({V2}) == 9
    assert c.not_under({V1, V2}) == 7  # V1 under either provider counts
    assert c.not_under(set()) == 11


def test_the_json_of_a_census_has_its_stable_shape():
    assert sample().to_json() == {
        "resource": "secrets",
        "keyPrefix": "/registry/secrets/",
        "objects": 11,
        "plaintext": 2,
        "otherEncryption": 3,
        "unreadable": 1,
        "byKeyID": [
            {"provider": "keyward", "keyID": V1, "objects": 1},
            {"provider": "keyward", "keyID": V2, "objects": 2},
            {"provider": "keyward", "keyID": V10, "objects": 1},
            {"provider": "other-kms", "keyID": V1, "objects": 1},
        ],
        "otherEncryptionByProvider": [
            {"provider": "aescbc", "objects": 2},
            {"provider": "secretbox", "objects": 1},
        ],
    }


def test_the_document_names_prefix_endpoint_and_revision():
    doc = census.document(
        "/registry", 42, "https://10.0.0.5:2379", [census.take(census.resource("configmaps"), [])]
    )
    assert doc == {
        "etcdPrefix": "/registry",
        "etcdEndpoint": "https://10.0.0.5:2379",
        "revision": 42,
        "resources": [
            {
                "resource": "configmaps",
                "keyPrefix": "/registry/configmaps/",
                "objects": 0,
                "plaintext": 0,
                "otherEncryption": 0,
                "unreadable": 0,
                "byKeyID": [],
                "otherEncryptionByProvider": [],
            }
        ],
    }
