"""The operator runs a key's whole lifecycle from EncryptionKey and RotationPolicy resources.

Real parts only: kube-apiserver and etcd, Keyward's CRDs, the operator process, the plugin process and one
SoftHSM2 token they share. The plugin serves the key `secrets`; other tests use keys of their own.
"""

from __future__ import annotations

import datetime
import itertools
import os
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest

from conftest import KEYWARD, OperatorCluster, wait_for
from keyward import atrest
from kmsplugin.client import KmsClient

pytestmark = pytest.mark.e2e


def policy(name: str, **fields: str) -> str:
    lines = "".join(f"  {k}: {v!r}\n" for k, v in fields.items())
    head = f"apiVersion: keyward.io/v1alpha1\nkind: RotationPolicy\nmetadata:\n  name: {name}\n"
    return f"{head}spec:\n{lines or '  {}'}"


def encryption_key(name: str, policy_name: str | None = None, versions: str = "") -> str:
    spec = f"  rotationPolicyRef:\n    name: {policy_name}\n" if policy_name else "  {}\n"
    head = f"apiVersion: keyward.io/v1alpha1\nkind: EncryptionKey\nmetadata:\n  name: {name}\n"
    return f"{head}spec:\n{spec}{versions}"


@pytest.fixture(scope="module", autouse=True)
def default_policy(operator_cluster: OperatorCluster) -> None:
    """Every test may refer to the policy `default`; tests that need others apply their own."""
    operator_cluster.apply(policy("default", minimumRotationInterval="2s"))


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
    # Referenced as a cluster-scoped object, so `kubectl describe` lists them too.
    assert "KeyAdopted" in c.kubectl("describe", "encryptionkey", "secrets").stdout


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


def versions_of(c: OperatorCluster, name: str) -> list[dict[str, Any]]:
    return c.hsm_keys().get(name, {}).get("versions", [])


def test_scheduled_rotation_happens_on_time_and_the_minimum_interval_holds(operator_cluster):
    c = operator_cluster
    c.apply(policy("fast", rotationPeriod="8s", minimumRotationInterval="1s"))
    c.apply(policy("capped", rotationPeriod="3s", minimumRotationInterval="3s", decryptOnlyPeriod="1h"))
    c.apply(encryption_key("fast-key", "fast"))
    wait_for(
        lambda: len(versions_of(c, "fast-key")) >= 3, timeout=60, what=f"two scheduled rotations\n{c.logs()}"
    )
    created = [datetime.datetime.fromisoformat(v["createdAt"]) for v in versions_of(c, "fast-key")]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(created)]
    # Due every 8 s; the operator's timer ticks every second, so each rotation is at most a few seconds late.
    assert all(8 <= g <= 14 for g in gaps[:2]), gaps
    assert c.key("fast-key")["status"]["nextRotationTime"]
    # A request before the minimum interval has passed waits; it is then done once.
    c.apply(policy("slow-min", rotationPeriod="1h", minimumRotationInterval="20s"))
    c.apply(encryption_key("rate-limited", "slow-min"))
    wait_for(lambda: ready(c, "rate-limited"), timeout=30, what="Ready")
    c.kubectl(
        "annotate", "encryptionkey", "rate-limited", "keyward.io/rotate-requested-at=now", "--overwrite"
    )
    cond = wait_for(
        lambda: (x := c.condition("rate-limited", "RotationRequestHandled")) and x,
        timeout=20,
        what="the rate-limit condition",
    )
    assert cond["status"] == "False" and cond["reason"] == "RotationRateLimited", cond
    assert len(versions_of(c, "rate-limited")) == 1
    wait_for(lambda: len(versions_of(c, "rate-limited")) == 2, timeout=40, what="the deferred rotation")
    v1, v2 = (datetime.datetime.fromisoformat(v["createdAt"]) for v in versions_of(c, "rate-limited"))
    assert (v2 - v1).total_seconds() >= 20
    # Stop these keys from rotating every few seconds under the tests that follow.
    deleted = c.kubectl("delete", "encryptionkey", "fast-key", "rate-limited", "--timeout=60s", check=False)
    assert deleted.returncode == 0, f"{deleted.stderr}\n{c.logs()}"


def test_an_operator_killed_between_generating_and_promoting_completes_the_rotation_once(operator_cluster):
    c = operator_cluster
    c.apply(encryption_key("crashy", "default"))
    wait_for(lambda: ready(c, "crashy"), timeout=30, what="Ready")
    c.operator.stop()
    crashing = c.new_operator("operator-crash", KEYWARD_FAILPOINTS="store.after-generate")
    try:
        crashing.start()
        c.kubectl("annotate", "encryptionkey", "crashy", "keyward.io/rotate-requested-at=once", "--overwrite")
        wait_for(
            lambda: crashing.exited() is not None, timeout=60, what="the operator to die at the failpoint"
        )
        assert "failpoint store.after-generate reached" in crashing.log_path.read_text()
        half = versions_of(c, "crashy")
        assert [v["state"] for v in half] == ["Enabled", "PendingGeneration"]
    finally:
        crashing.stop()
        c.operator.start()
    wait_for(
        lambda: c.key("crashy")["status"].get("lastHandledRotateRequest") == "once",
        timeout=60,
        what=f"the rotation to complete\n{c.logs()}",
    )
    done = versions_of(c, "crashy")
    assert [(v["version"], v["state"]) for v in done] == [(1, "Enabled"), (2, "Enabled")]
    assert c.key("crashy")["status"]["primaryVersion"] == 2
    assert count_key_objects(c, [v["objectId"] for v in done]) == 2, "an orphaned or duplicate key object"


# Lists the token's secret-key objects as "<id hex> <label>" lines, from a process of its own (the PKCS#11
# module is loaded once per process, and this test process never loads it).
_LIST_KEY_OBJECTS = """
import os, pkcs11
from pkcs11 import Attribute, ObjectClass
lib = pkcs11.lib(os.environ["KEYWARD_PKCS11_MODULE"])
token = lib.get_token(token_label=os.environ["KEYWARD_TOKEN_LABEL"])
with open(os.environ["KEYWARD_PIN_FILE"]) as f:
    session = token.open(user_pin=f.read().strip())
for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
    print(bytes(key[Attribute.ID]).hex(), key[Attribute.LABEL])
"""


def token_key_objects(c: OperatorCluster) -> list[tuple[str, str]]:
    out = subprocess.run(
        [sys.executable, "-c", _LIST_KEY_OBJECTS],
        env=c.plugin.environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    return [(line.split()[0], line.split()[1]) for line in out.stdout.splitlines()]


def count_key_objects(c: OperatorCluster, object_ids: list[str]) -> int:
    objects = token_key_objects(c)
    matching = sum(1 for oid, _ in objects if oid in object_ids)
    labelled = sum(1 for _, label in objects if label.startswith("keyward/crashy/"))
    assert matching == labelled, (
        f"{labelled} key objects carry the key's label, {matching} are in its manifest"
    )
    return matching


def test_disable_enable_schedule_cancel_and_destroy_a_version(operator_cluster):
    c = operator_cluster
    c.apply(
        policy("short-window", rotationPeriod="90d", minimumRotationInterval="1s", destructionWindow="6s")
    )
    c.apply(encryption_key("secrets", "short-window"))
    status = wait_for(
        lambda: (s := c.key("secrets")["status"]).get("rotationPolicy") == "short-window" and s,
        timeout=30,
        what="the new policy",
    )
    with KmsClient(c.socket_path) as kms:
        kms.status()
        sealed = kms.encrypt(b"x" * 32)
    old = sealed.key_id
    old_version = status["primaryVersion"]
    c.kubectl(
        "annotate", "encryptionkey", "secrets", "keyward.io/rotate-requested-at=before-disable", "--overwrite"
    )
    wait_for(
        lambda: c.key("secrets")["status"]["primaryVersion"] == old_version + 1, timeout=30, what="rotation"
    )

    def set_state(state: str) -> None:
        c.kubectl(
            "patch",
            "encryptionkey",
            "secrets",
            "--type",
            "merge",
            "-p",
            f'{{"spec":{{"versions":[{{"version":{old_version},"state":"{state}"}}]}}}}',
        )

    def hsm_state() -> str:
        return next(v["state"] for v in versions_of(c, "secrets") if v["version"] == old_version)

    def decrypts() -> bool:
        with KmsClient(c.socket_path) as kms:
            try:
                return kms.decrypt(sealed.ciphertext, old) == b"x" * 32
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
                return False

    set_state("Disabled")
    wait_for(lambda: hsm_state() == "Disabled", timeout=30, what="Disabled")
    wait_for(lambda: not decrypts(), timeout=10, what="the plugin to refuse the disabled version")
    set_state("Enabled")
    wait_for(lambda: hsm_state() == "Enabled", timeout=30, what="Enabled")
    wait_for(decrypts, timeout=10, what="the plugin to decrypt again")
    set_state("Disabled")
    wait_for(lambda: hsm_state() == "Disabled", timeout=30, what="Disabled again")
    c.kubectl("patch", "encryptionkey", "secrets", "--type", "merge", "-p", '{"spec":{"versions":[]}}')
    set_state("Destroyed")
    wait_for(lambda: hsm_state() == "DestroyScheduled", timeout=30, what="DestroyScheduled")
    set_state("Disabled")  # cancel within the window
    wait_for(lambda: hsm_state() == "Disabled", timeout=30, what="cancellation back to Disabled")
    set_state("Destroyed")
    wait_for(lambda: hsm_state() == "Destroyed", timeout=60, what=f"destruction after the window\n{c.logs()}")
    destroyed = next(v for v in versions_of(c, "secrets") if v["version"] == old_version)
    assert destroyed["objectId"] not in {oid for oid, _ in token_key_objects(c)}
    assert not decrypts()
    reasons = c.kubectl(
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=secrets",
        "-o",
        "jsonpath={.items[*].reason}",
    ).stdout.split()
    for reason in (
        "VersionDisabled",
        "VersionEnabled",
        "DestructionScheduled",
        "DestructionCancelled",
        "VersionDestroyed",
        "Rotated",
    ):
        assert reason in reasons, reasons


def test_a_missing_rotation_policy_is_reported_and_nothing_is_created_in_the_hsm(operator_cluster):
    c = operator_cluster
    c.apply(encryption_key("orphan", "no-such-policy"))
    cond = wait_for(lambda: (x := c.condition("orphan", "Ready")) and x, timeout=30, what="a Ready condition")
    assert cond["status"] == "False" and cond["reason"] == "RotationPolicyNotFound"
    assert "RotationPolicy 'no-such-policy' does not exist" in cond["message"]
    assert "orphan" not in c.hsm_keys()
    time.sleep(4)  # several timer ticks (1 s) meet the same problem: one Warning, not one per tick
    warnings = c.kubectl(
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=orphan,reason=RotationPolicyNotFound",
        "-o",
        "name",
    ).stdout.split()
    assert len(warnings) == 1, warnings
    c.apply(policy("no-such-policy"))
    wait_for(lambda: ready(c, "orphan"), timeout=30, what="Ready once the policy exists")
    assert "orphan" in c.hsm_keys()


def test_deleting_an_encryption_key_keeps_its_hsm_material(operator_cluster):
    c = operator_cluster
    c.apply(encryption_key("retired", "default"))
    wait_for(lambda: ready(c, "retired"), timeout=30, what="Ready")
    key_id = c.key("retired")["status"]["primaryKeyID"]
    # The operator's timer reconciles every second; a delete must not wait for Kopf's default 60 s poll.
    c.kubectl("delete", "encryptionkey", "retired", "--timeout=20s")
    assert c.key("retired") == {}
    assert c.hsm_keys()["retired"]["primaryKeyId"] == key_id
    # Created again, it adopts the same material.
    c.apply(encryption_key("retired", "default"))
    wait_for(lambda: ready(c, "retired"), timeout=30, what="Ready after re-creation")
    assert c.key("retired")["status"]["primaryKeyID"] == key_id


def test_keyward_rotate_asks_the_operator_and_the_audit_names_the_user(operator_cluster):
    c = operator_cluster

    def keyward_rotate(name: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(c.apiserver.kubeconfig)}
        return subprocess.run(
            [str(KEYWARD), "rotate", name], env=env, capture_output=True, text=True, check=False
        )

    c.apply(encryption_key("audited", "default"))
    wait_for(lambda: ready(c, "audited"), timeout=30, what="Ready")
    out = keyward_rotate("audited")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: c.key("audited")["status"].get("primaryVersion") == 2, timeout=30, what="the rotation")
    rotations = [
        line
        for line in c.operator.log_path.read_text().splitlines()
        if '"event": "key.rotate"' in line and '"key": "audited"' in line
    ]
    assert rotations and '"actor": "kubernetes:keyward-admin"' in rotations[-1], rotations
    # A later plain `kubectl annotate` is not credited to whoever ran `keyward rotate` before.
    c.kubectl(
        "annotate", "encryptionkey", "audited", "keyward.io/rotate-requested-at=by-kubectl", "--overwrite"
    )
    wait_for(
        lambda: c.key("audited")["status"].get("primaryVersion") == 3, timeout=30, what="the second rotation"
    )
    rotations = [
        line
        for line in c.operator.log_path.read_text().splitlines()
        if '"event": "key.rotate"' in line and '"key": "audited"' in line
    ]
    assert '"actor": "operator:keyward"' in rotations[-1] and "keyward-admin" not in rotations[-1], rotations
    missing = keyward_rotate("nope")
    assert missing.returncode == 1 and "EncryptionKey 'nope' does not exist" in missing.stderr


def test_two_operator_replicas_never_both_act_and_the_follower_takes_over(operator_cluster):
    c = operator_cluster
    follower = c.new_operator("operator-2")
    follower.start()
    assert "leadership.waiting" in follower.log_path.read_text()
    c.apply(encryption_key("leader-test", "default"))
    wait_for(lambda: ready(c, "leader-test"), timeout=30, what="Ready")
    assert "leader-test" not in follower.log_path.read_text(), "the follower acted while the leader led"
    c.operator.kill()  # no release: the follower must wait for the Lease to expire
    c.apply(encryption_key("after-failover", "default"))
    wait_for(
        lambda: ready(c, "after-failover"),
        timeout=60,
        what=f"the follower to take over\n{follower.log_tail()}",
    )
    assert "leadership.acquired" in follower.log_path.read_text()
    follower.stop()
    c.operator.start()


def test_a_spec_entry_for_the_next_version_holds_rotation_and_the_status_keeps_up(operator_cluster):
    c = operator_cluster
    c.apply(
        encryption_key(
            "pre-disabled", "default", versions="  versions:\n    - {version: 2, state: Disabled}\n"
        )
    )
    wait_for(lambda: ready(c, "pre-disabled"), timeout=30, what="Ready")
    c.kubectl(
        "annotate", "encryptionkey", "pre-disabled", "keyward.io/rotate-requested-at=blocked", "--overwrite"
    )
    cond = wait_for(
        lambda: (x := c.condition("pre-disabled", "RotationRequestHandled")) and x,
        timeout=30,
        what="the rotation to be held",
    )
    assert cond["status"] == "False" and cond["reason"] == "NextVersionBlocked", cond
    assert "version 2 to be Disabled" in cond["message"]
    assert [v["version"] for v in versions_of(c, "pre-disabled")] == [1], "the HSM must not rotate"
    c.kubectl("patch", "encryptionkey", "pre-disabled", "--type", "merge", "-p", '{"spec":{"versions":[]}}')
    wait_for(
        lambda: c.key("pre-disabled")["status"].get("primaryVersion") == 2,
        timeout=30,
        what="the held rotation once the entry is gone, recorded in status",
    )
    assert [v["version"] for v in versions_of(c, "pre-disabled")] == [1, 2]
