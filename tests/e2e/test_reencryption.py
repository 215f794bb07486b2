"""Re-encryption after a rotation, proven on what etcd stores; retirement only after it; requested runs.

Real parts only: kube-apiserver and etcd, the plugin and the operator processes, one SoftHSM2 token. The
tests share one control plane and the `secrets` key, and run in file order: each rotates it once more.
What etcd holds is read here with the envelope protobuf directly, not with the code the audit uses.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import KEYWARD, OperatorCluster, etcd_env, running, wait_for
from keyward.wire import envelope_pb2

pytestmark = pytest.mark.e2e

PREFIX = b"k8s:enc:kms:v2:keyward:"
STATUS_METRIC = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"


@pytest.fixture(scope="module")
def c() -> Iterator[OperatorCluster]:
    for cluster in running(OperatorCluster, "kwr-"):
        # Pages of 100 so that a run of a few hundred objects persists progress several times.
        cluster.operator.stop()
        cluster.operator = cluster.new_operator("operator-r", KEYWARD_REENCRYPT_PAGE_SIZE="100")
        cluster.operator.start()
        yield cluster


def policy(name: str, rate: int, **fields: str) -> str:
    lines = "".join(f"  {k}: {v!r}\n" for k, v in {"minimumRotationInterval": "1s", **fields}.items())
    return (
        f"apiVersion: keyward.io/v1alpha1\nkind: RotationPolicy\nmetadata:\n  name: {name}\nspec:\n{lines}"
        f"  reencryption:\n    objectsPerSecond: {rate}\n"
    )


def use_policy(c: OperatorCluster, name: str) -> None:
    c.apply(
        "apiVersion: keyward.io/v1alpha1\nkind: EncryptionKey\nmetadata:\n  name: secrets\n"
        f"spec:\n  rotationPolicyRef:\n    name: {name}\n"
    )
    wait_for(lambda: c.key("secrets").get("status", {}).get("rotationPolicy") == name, timeout=30, what=name)


def status(c: OperatorCluster) -> dict[str, Any]:
    return dict(c.key("secrets").get("status") or {})


def run(c: OperatorCluster) -> dict[str, Any]:
    return dict(status(c).get("reencryption") or {})


def versions(c: OperatorCluster) -> dict[int, str]:
    return {v["version"]: v["state"] for v in status(c).get("versions", [])}


def stored_key_ids(c: OperatorCluster) -> dict[str, str]:
    """etcd key -> the keyID its envelope names, or 'plaintext'."""
    out = {}
    for key, value in c.etcd.items("/registry/secrets/").items():
        if value.startswith(PREFIX):
            obj = envelope_pb2.EncryptedObject()
            obj.ParseFromString(value[len(PREFIX) :])
            out[key] = obj.keyID
        else:
            assert not value.startswith(b"k8s:enc:"), f"{key}: unexpected encryption {value[:30]!r}"
            out[key] = "plaintext"
    return out


def secret_values(c: OperatorCluster) -> dict[str, str]:
    items = json.loads(c.kubectl("get", "secrets", "-A", "-o", "json").stdout)["items"]
    return {
        f"{s['metadata']['namespace']}/{s['metadata']['name']}": base64.b64decode(s["data"]["v"]).decode()
        for s in items
        if "v" in (s.get("data") or {})
    }


def create_secrets(c: OperatorCluster, prefix: str, count: int, namespaces: int) -> dict[str, str]:
    names = [f"{prefix}-{i}" for i in range(namespaces)]
    spaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
    c.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": spaces}))
    values = {
        f"{names[i % namespaces]}/s{i}": f"{prefix}-value-{i}-{random.randrange(10**9)}" for i in range(count)
    }
    items = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": key.split("/")[0], "name": key.split("/")[1]},
            "stringData": {"v": value},
        }
        for key, value in values.items()
    ]
    c.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return values


def rotate(c: OperatorCluster, request: str) -> str:
    """Asks for a rotation and returns the new primary's key_id."""
    before = int(status(c).get("primaryVersion") or 0)
    c.kubectl(
        "annotate", "encryptionkey", "secrets", f"keyward.io/rotate-requested-at={request}", "--overwrite"
    )
    wait_for(lambda: status(c).get("primaryVersion") == before + 1, timeout=30, what=f"rotation {request}")
    return str(status(c)["primaryKeyID"])


def restart_apiserver(c: OperatorCluster) -> None:
    """Restarts kube-apiserver, and the operator if it stopped leading meanwhile, as a Deployment would.

    An operator that cannot renew its Lease for 10 s stops (exit code 1) rather than risk two leaders.
    """
    c.apiserver.restart()
    if c.operator.exited() is not None:
        assert c.operator.exited() == 1, c.operator.log_tail(20)
        c.operator.start(timeout=90)


def adopt_now(c: OperatorCluster, key_id: str) -> None:
    """Restarts the apiserver once the plugin reports ``key_id``: it adopts it at start, not a minute on."""
    wait_for(lambda: c.status_key_id() == key_id, timeout=30, what="the plugin to report the new key")
    restart_apiserver(c)


def wait_phase(c: OperatorCluster, key_id: str, phase: str, timeout: float = 120) -> dict[str, Any]:
    wait_for(
        lambda: run(c).get("targetKeyID") == key_id and run(c).get("phase") == phase,
        timeout=timeout,
        what=f"re-encryption to {key_id} {phase}: {run(c)}\n{c.logs()}",
        interval=0.5,
    )
    return run(c)


def adopted(c: OperatorCluster, key_id: str) -> bool:
    import hashlib

    wanted = "sha256:" + hashlib.sha256(key_id.encode()).hexdigest()
    return any(
        line.startswith(STATUS_METRIC) and wanted in line for line in c.apiserver.metrics().splitlines()
    )


def audit(c: OperatorCluster) -> dict[str, int]:
    """What `keyward audit --json` counts for secrets: key_id (or 'plaintext') -> objects."""
    out = subprocess.run(
        [str(KEYWARD), "audit", "--json"], env=etcd_env(c), capture_output=True, text=True, check=True
    )
    (secrets,) = json.loads(out.stdout)["resources"]
    counts = {k["keyID"]: k["objects"] for k in secrets["byKeyID"]}
    if secrets["plaintext"]:
        counts["plaintext"] = secrets["plaintext"]
    return counts


def reencrypt(c: OperatorCluster) -> str:
    """`keyward reencrypt secrets`, as an admin would run it; returns what it printed."""
    out = subprocess.run(
        [str(KEYWARD), "reencrypt", "secrets"],
        env={**os.environ, "KUBECONFIG": str(c.apiserver.kubeconfig)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_counts_add_up(r: dict[str, Any]) -> None:
    parts = sum(r[k] for k in ("rewritten", "unchanged", "conflicts", "deleted", "failures"))
    assert parts == r["seen"], r


def test_after_a_rotation_every_secret_is_rewritten_unchanged_and_the_old_version_retires(c):
    c.apply(policy("reencrypt-a", 400, decryptOnlyPeriod="20s"))
    use_policy(c, "reencrypt-a")
    values = create_secrets(c, "ra", 500, 5)
    v1 = str(status(c)["primaryKeyID"])
    assert set(stored_key_ids(c).values()) == {v1}

    v2 = rotate(c, "a")
    # Until the apiserver reports v2, nothing is rewritten: a rewrite would store v1 again.
    while not adopted(c, v2):
        r = run(c)
        assert r.get("phase") in (None, "WaitingForAdoption") or r.get("targetKeyID") != v2, r
        assert r.get("seen", 0) == 0 or r.get("targetKeyID") != v2, r
        assert v2 not in stored_key_ids(c).values()
        time.sleep(1)
    r = wait_phase(c, v2, "Succeeded", timeout=60)

    assert r["seen"] == 500 and r["rewritten"] == 500 and r["failures"] == 0, r
    assert r["resources"][0]["resource"] == "secrets" and r["resources"][0]["done"] is True
    stored = stored_key_ids(c)
    assert len(stored) == 500 and set(stored.values()) == {v2}, "every Secret is under version 2 in etcd"
    assert audit(c) == {v2: 500}, "keyward audit agrees with the direct read"
    assert secret_values(c) == values, "no value changed"
    wait_for(
        lambda: c.condition("secrets", "Reencrypted").get("status") == "True",
        timeout=20,
        what="Reencrypted=True",
    )
    events = json.loads(c.kubectl("get", "events", "-o", "json").stdout)["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "secrets"}
    assert {"ReencryptionStarted", "ReencryptionFinished"} <= reasons, reasons

    # Version 1 retires by itself once the decryptOnlyPeriod (20 s after the run finished) has passed.
    wait_for(
        lambda: c.condition("secrets", "VersionsRetired").get("reason") == "DecryptOnlyPeriod",
        timeout=15,
        what="retirement to wait for the decryptOnlyPeriod",
    )
    assert versions(c)[1] == "Enabled"
    wait_for(lambda: versions(c)[1] == "Disabled", timeout=90, what=f"version 1 retired: {status(c)}")
    assert c.condition("secrets", "VersionsRetired")["status"] == "True"
    restart_apiserver(c)  # no cached DEK: every Secret is decrypted through the HSM again
    assert secret_values(c) == values


def test_concurrent_updates_deletes_and_creates_are_neither_lost_nor_undone(c):
    c.apply(policy("reencrypt-b", 40))
    use_policy(c, "reencrypt-b")
    before = secret_values(c)
    v3 = rotate(c, "b")
    adopt_now(c, v3)
    wait_phase(c, v3, "Running", timeout=60)

    keys = sorted(before)
    rng = random.Random(3)
    updated = {k: f"updated-{rng.randrange(10**9)}" for k in rng.sample(keys, 40)}
    deleted = set(rng.sample(sorted(set(keys) - set(updated)), 25))
    created = {f"ra-0/new{i}": f"created-{i}" for i in range(25)}
    errors: list[str] = []

    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(c.apiserver.kubeconfig)))

    def writer() -> None:
        try:
            for i, (key, value) in enumerate(updated.items()):
                ns, name = key.split("/")
                core.patch_namespaced_secret(name, ns, {"stringData": {"v": value}})
                if i < len(deleted):
                    gone_ns, gone = sorted(deleted)[i].split("/")
                    core.delete_namespaced_secret(gone, gone_ns)
                    new = sorted(created)[i]
                    body = client.V1Secret(
                        metadata=client.V1ObjectMeta(name=new.split("/")[1]), string_data={"v": created[new]}
                    )
                    core.create_namespaced_secret("ra-0", body)
                time.sleep(0.05)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(repr(exc))

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(timeout=120)
    assert not errors, errors
    assert run(c)["phase"] == "Running", "the writes must land while the re-encryption runs"
    r = wait_phase(c, v3, "Succeeded", timeout=120)

    expected = {k: v for k, v in before.items() if k not in deleted} | updated | created
    assert secret_values(c) == expected, "an update was lost or a deleted Secret came back"
    stored = stored_key_ids(c)
    assert len(stored) == len(expected) and set(stored.values()) == {v3}
    assert r["failures"] == 0
    assert_counts_add_up(r)
    assert r["conflicts"] + r["deleted"] + r["unchanged"] > 0, f"the concurrent writes were not seen: {r}"


def test_a_run_resumes_from_its_last_page_after_an_operator_kill_and_an_apiserver_restart(c):
    c.apply(policy("reencrypt-c", 30))
    use_policy(c, "reencrypt-c")
    total = len(stored_key_ids(c))
    v4 = rotate(c, "c")
    adopt_now(c, v4)
    wait_for(
        lambda: run(c).get("targetKeyID") == v4 and run(c).get("seen", 0) >= 200,
        timeout=60,
        what=f"two pages done: {run(c)}",
        interval=0.2,
    )
    c.operator.kill()
    at_kill = run(c)
    assert at_kill["phase"] == "Running" and at_kill["seen"] < total, at_kill
    c.operator.start(timeout=90)  # waits for the dead replica's Lease to expire

    # And the apiserver restarts under the resumed run: it waits and carries on, nothing fails.
    wait_for(lambda: run(c).get("seen", 0) > at_kill["seen"], timeout=60, what="the resumed run's next page")
    assert run(c)["phase"] == "Running"
    restart_apiserver(c)
    r = wait_phase(c, v4, "Succeeded", timeout=120)
    assert r["startedAt"] == at_kill["startedAt"], "the same run resumed; a new one was not started"
    assert r["seen"] == total and r["failures"] == 0, r
    assert_counts_add_up(r)
    log = c.operator.log_path.read_text()
    resumed = [json.loads(line) for line in log.splitlines() if '"msg": "reencrypt.resumed"' in line]
    assert resumed and resumed[-1]["seen"] >= at_kill["seen"] > 0, "it resumed after the saved pages"
    assert set(stored_key_ids(c).values()) == {v4}


VAP = """
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: frozen-secrets}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {apiGroups: [""], apiVersions: [v1], operations: [UPDATE], resources: [secrets]}
  validations:
    - expression: "!has(object.metadata.labels) || !('keyward-test/frozen' in object.metadata.labels)"
      message: this Secret is frozen for the test
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: frozen-secrets}
spec:
  policyName: frozen-secrets
  validationActions: [Deny]
"""


def test_an_object_that_keeps_failing_blocks_retirement_until_a_requested_run_succeeds(c):
    probes = itertools.count()  # a label change each time: kubectl sends nothing for an unchanged label
    c.apply(policy("reencrypt-d", 200, decryptOnlyPeriod="1s"))
    use_policy(c, "reencrypt-d")
    c.kubectl("create", "namespace", "rd")
    c.kubectl("create", "secret", "generic", "stuck", "-n", "rd", "--from-literal=v=stuck")
    c.kubectl("label", "secret", "stuck", "-n", "rd", "keyward-test/frozen=yes")
    c.apply(VAP)
    wait_for(
        lambda: (
            c.kubectl(
                "label", "secret", "stuck", "-n", "rd", f"probe={next(probes)}", "--overwrite", check=False
            ).returncode
        ),
        timeout=30,
        what="the admission policy to refuse updates",
    )
    old = status(c)["primaryVersion"]
    v5 = rotate(c, "d")
    adopt_now(c, v5)
    r = wait_phase(c, v5, "Failed", timeout=90)
    assert r["failures"] == 1 and any("rd/stuck" in f for f in r["failedObjects"]), r
    retired = c.condition("secrets", "VersionsRetired")
    wait_for(
        lambda: c.condition("secrets", "VersionsRetired").get("reason") == "ReencryptionFailed",
        timeout=20,
        what="the blocked retirement in a condition",
    )
    retired = c.condition("secrets", "VersionsRetired")
    assert retired["status"] == "False" and "rd/stuck" in retired["message"], retired
    time.sleep(3)  # well past the 1s decryptOnlyPeriod: still nothing retires
    assert versions(c)[old] == "Enabled", "a version that may still protect a Secret was disabled"
    assert stored_key_ids(c)["/registry/secrets/rd/stuck"] == f"{status(c)['versions'][old - 1]['keyID']}"

    c.kubectl("delete", "validatingadmissionpolicybinding", "frozen-secrets")
    wait_for(
        lambda: (
            c.kubectl(
                "label", "secret", "stuck", "-n", "rd", f"probe={next(probes)}", "--overwrite", check=False
            ).returncode
            == 0
        ),
        timeout=30,
        what="the admission policy to be gone",
    )
    reencrypt(c)
    wait_for(lambda: run(c).get("trigger") == "Requested", timeout=30, what="the requested run")
    r = wait_phase(c, v5, "Succeeded", timeout=90)
    assert r["failures"] == 0
    wait_for(lambda: versions(c)[old] == "Disabled", timeout=30, what=f"version {old} retired")
    assert set(stored_key_ids(c).values()) == {v5}


IDENTITY_FIRST = """apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - identity: {{}}
      - kms: {{apiVersion: v2, name: keyward, endpoint: "unix://{socket}", timeout: 3s}}
"""


def test_secrets_written_before_encryption_was_turned_on_are_encrypted_by_a_requested_run(c):
    encrypted_config = c.apiserver.encryption_config
    plain = c.base / "identity-first.yaml"
    plain.write_text(IDENTITY_FIRST.format(socket=c.socket_path))
    c.apiserver.encryption_config = plain
    try:
        restart_apiserver(c)
        values = create_secrets(c, "re", 30, 2)
    finally:
        c.apiserver.encryption_config = encrypted_config
        restart_apiserver(c)
    stored = stored_key_ids(c)
    plaintext = {k for k, v in stored.items() if v == "plaintext"}
    assert len(plaintext) == 30, "the test needs Secrets stored in plaintext"
    assert audit(c)["plaintext"] == 30

    primary = str(status(c)["primaryKeyID"])
    before = run(c).get("request")
    out = reencrypt(c)
    wait_for(
        lambda: run(c).get("trigger") == "Requested" and run(c).get("request") != before,
        timeout=30,
        what=f"the requested run to start ({out})",
    )
    r = wait_phase(c, primary, "Succeeded", timeout=60)
    assert r["trigger"] == "Requested" and r["rewritten"] >= 30, r
    after = stored_key_ids(c)
    assert set(after.values()) == {primary}, "no Secret is left in plaintext"
    assert audit(c) == {primary: len(after)}
    got = secret_values(c)
    assert {k: got[k] for k in values} == values


def test_an_expired_continue_token_resumes_where_etcd_allows_and_nothing_is_skipped(c):
    """The operator was down past a compaction and the apiserver restarted: its saved token is stale."""
    from kubernetes import config

    from keyward_operator import kubehttp
    from keyward_operator.reencryption import objects, record, rewriting

    api = objects.Objects(kubehttp.KubeHttp(config.new_client_from_config(str(c.apiserver.kubeconfig))))
    secrets = api.resolve("secrets")
    create_secrets(c, "rx", 120, 1)
    first = api.list_page(secrets, limit=50, continue_token=None)
    assert first.continue_token
    c.kubectl("create", "secret", "generic", "after-the-token", "-n", "default", "--from-literal=v=x")
    c.etcd.compact()
    restart_apiserver(c)  # its watch cache held the list's snapshot; etcd no longer has that revision
    with pytest.raises(objects.ContinueExpired) as expired:
        api.list_page(secrets, limit=50, continue_token=first.continue_token)

    progress = record.ResourceProgress("secrets", continue_token=first.continue_token)
    a_run = record.Run(
        2, "k/v2/x", "Rotation", record.RUNNING, requested_at=datetime.datetime.now(datetime.UTC)
    )
    a_run.resources = [progress]
    pages: list[int] = []
    rewriting.Rewriter(api, rate=1000, page_size=100).run(
        a_run, should_stop=lambda: False, on_page=lambda: pages.append(progress.seen)
    )
    total = len(stored_key_ids(c))
    assert progress.relists == 1 and progress.done
    if expired.value.restart_token:
        # It went on from the token's key, not from the start: the 50 listed before, and the Secret
        # written after the token (default/ sorts before rx-0/; it was stored under the current key) are
        # not seen again.
        assert progress.seen == total - 51
    else:
        assert progress.seen == total, "without a restart token it lists everything again"
    assert progress.failures == 0 and progress.seen == progress.rewritten + progress.unchanged


def test_a_rotation_run_that_rewrites_nothing_proves_nothing_and_retires_nothing(c):
    """configmaps are not encrypted here: rewriting them says nothing about where the Secrets are."""
    c.apply(
        policy("reencrypt-f", 200, decryptOnlyPeriod="1s").replace(
            "objectsPerSecond: 200", "objectsPerSecond: 200\n    resources: [configmaps]"
        )
    )
    use_policy(c, "reencrypt-f")
    c.kubectl("create", "configmap", "plain", "-n", "default", "--from-literal=v=1")
    old = status(c)["primaryVersion"]
    new = rotate(c, "f")
    adopt_now(c, new)
    r = wait_phase(c, new, "Failed", timeout=90)
    assert r["rewritten"] == 0 and r["unchanged"] >= 1, r
    assert "nothing of configmaps was rewritten" in r["message"], r["message"]
    wait_for(
        lambda: c.condition("secrets", "VersionsRetired").get("reason") == "ReencryptionFailed",
        timeout=20,
        what="the blocked retirement",
    )
    time.sleep(3)  # past the 1 s decryptOnlyPeriod
    assert versions(c)[old] == "Enabled", "a version that still protects every Secret was retired"
