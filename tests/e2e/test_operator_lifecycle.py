"""The operator runs a key's whole lifecycle from EncryptionKey and RotationPolicy resources.

Real parts only: kube-apiserver and etcd, Keyward's CRDs, the operator process, the plugin process and one
SoftHSM2 token they share. The plugin serves the key `secrets`; other tests use keys of their own.
"""

from __future__ import annotations

import pytest

from conftest import OperatorCluster, wait_for
from keyward import atrest

pytestmark = pytest.mark.e2e


def policy(name: str, **fields: str) -> str:
    lines = "".join(f"  {k}: {v!r}\n" for k, v in fields.items())
    head = f"apiVersion: keyward.io/v1alpha1\nkind: RotationPolicy\nmetadata:\n  name: {name}\n"
    return f"{head}spec:\n{lines or '  {}'}"


def encryption_key(name: str, policy_name: str | None = None, versions: str = "") -> str:
    spec = f"  rotationPolicyRef:\n    name: {policy_name}\n" if policy_name else "  {}\n"
    head = f"apiVersion: keyward.io/v1alpha1\nkind: EncryptionKey\nmetadata:\n  name: {name}\n"
    return f"{head}spec:\n{spec}{versions}"


def ready(c: OperatorCluster, name: str) -> bool:
    return c.condition(name, "Ready").get("status") == "True"


def test_the_key_the_plugin_serves_is_adopted_not_duplicated_and_reported_ready(operator_cluster):
    c = operator_cluster
    before = c.hsm_keys()["secrets"]
    c.apply(policy("default", minimumRotationInterval="2s"))
    c.apply(encryption_key("secrets", "default"))
    wait_for(lambda: ready(c, "secrets"), timeout=60, what=f"Ready=True\n{c.logs()}")
    status = c.key("secrets")["status"]
    assert status["primaryVersion"] == 1
    assert status["primaryKeyID"] == before["primaryKeyId"] == c.status_key_id()
    assert [v["keyId"] for v in c.hsm_keys()["secrets"]["versions"]] == [before["primaryKeyId"]]
    events = c.kubectl("get", "events", "-A", "--field-selector", "involvedObject.name=secrets").stdout
    assert "KeyAdopted" in events


def test_applying_a_new_encryption_key_generates_version_1_in_the_hsm(operator_cluster):
    c = operator_cluster
    c.apply(encryption_key("payments"))
    wait_for(lambda: ready(c, "payments"), timeout=60, what=f"Ready=True\n{c.logs()}")
    hsm = c.hsm_keys()["payments"]
    status = c.key("payments")["status"]
    assert status["primaryKeyID"] == hsm["primaryKeyId"] and status["primaryVersion"] == 1
    assert status["rotationPolicy"] == "(built-in defaults)"
    wide = c.kubectl("get", "encryptionkeys", "-o", "wide").stdout
    assert "payments" in wide and hsm["primaryKeyId"] in wide


def test_a_manual_rotation_makes_exactly_one_version_and_new_secrets_use_it(operator_cluster):
    c = operator_cluster
    c.kubectl("create", "secret", "generic", "before-rotation", "--from-literal=k=old")
    old_key_id = c.status_key_id()
    c.kubectl(
        "annotate", "encryptionkey", "secrets", "keyward.io/rotate-requested-at=request-1", "--overwrite"
    )
    wait_for(
        lambda: c.key("secrets")["status"].get("lastHandledRotateRequest") == "request-1",
        timeout=60,
        what=f"the request to be handled\n{c.logs()}",
    )
    # The same request seen again (re-applied, operator restarted) rotates nothing more.
    c.kubectl(
        "annotate", "encryptionkey", "secrets", "keyward.io/rotate-requested-at=request-1", "--overwrite"
    )
    c.operator.stop()
    c.operator.start()
    wait_for(lambda: c.condition("secrets", "Ready").get("status") == "True", timeout=30, what="Ready")
    versions = c.hsm_keys()["secrets"]["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    status = c.key("secrets")["status"]
    assert status["primaryVersion"] == 2 and status["primaryKeyID"] == versions[1]["keyId"]
    new_key_id = wait_for(
        lambda: (k := c.status_key_id()) != old_key_id and k, timeout=15, what="plugin Status"
    )
    assert new_key_id == status["primaryKeyID"]
    probe = iter(range(1000))

    def new_secret_under_new_key() -> bool:
        name = f"after-rotation-{next(probe)}"
        c.kubectl("create", "secret", "generic", name, "--from-literal=k=new")
        return atrest.inspect(c.raw("default", name)).key_id == new_key_id

    wait_for(new_secret_under_new_key, timeout=150, interval=5, what="a new Secret under the new key")
    assert c.kubectl("get", "secret", "before-rotation", "-o", "jsonpath={.data.k}").stdout == "b2xk"
