"""``keyward audit`` on a real control plane: its counts agree with etcd read directly, across a rotation.

One control plane for the module (SoftHSM2 token -> plugin -> etcd -> kube-apiserver encrypting Secrets;
ConfigMaps stay plaintext). The tests run in file order and build on each other's objects. Every audit
runs through the `keyward` entry point with only the etcd settings in its environment: no PKCS#11 module,
token or PIN, as an auditor on a control-plane node would run it.

The tests count etcd themselves (raw values read through the hack client, the keyward prefix, the key_ids
the plugin reports) rather than with keyward.atrest or keyward.census, which the audit uses.
"""

from __future__ import annotations

import base64
import collections
import json
import pathlib
import secrets
import subprocess
from typing import Any

import pytest

import localcluster
from conftest import KEYWARD, Cluster, etcd_env, wait_for
from keyward import etcd

pytestmark = pytest.mark.e2e
KMS_PREFIX = b"k8s:enc:kms:v2:keyward:"
written: list[str] = []  # every value this module wrote: none may ever appear in audit output


def audit(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(KEYWARD), "audit", *args],
        env=env or etcd_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    for value in written:
        assert value not in output and base64.b64encode(value.encode()).decode() not in output
    assert "Traceback" not in output, output
    return proc


def audit_json(cluster: Cluster, *args: str) -> dict[str, dict[str, Any]]:
    """``keyward audit --json ARGS``, its resources by name."""
    proc = audit(cluster, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["etcdPrefix"] == "/registry" and doc["revision"] > 0
    assert doc["etcdEndpoint"] == cluster.etcd.endpoint
    return {r["resource"]: r for r in doc["resources"]}


def one_line_error(proc: subprocess.CompletedProcess[str], *, report: bool = False) -> str:
    """The one stderr line of a failed audit; only a failed check (``report``) prints its report first."""
    assert proc.returncode != 0 and (proc.stdout != "") == report, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyward: "), proc.stderr
    return lines[0]


def direct_count(cluster: Cluster, prefix: str, key_ids: list[str]) -> collections.Counter[str]:
    """Objects under ``prefix`` by the known key_id their value names, or "plaintext"."""
    counts: collections.Counter[str] = collections.Counter()
    for key, value in cluster.etcd.items(prefix).items():
        if value.startswith(KMS_PREFIX):
            named = [k for k in key_ids if k.encode() in value]
            assert len(named) == 1, f"{key}: names {named} of {key_ids}"
            counts[named[0]] += 1
        else:
            assert not value.startswith(b"k8s:enc:"), key
            counts["plaintext"] += 1
    return counts


def create(cluster: Cluster, kind: str, name: str) -> None:
    value = f"{kind}-value-{secrets.token_hex(10)}"
    written.append(value)
    extra = ["generic"] if kind == "secret" else []
    cluster.kubectl("create", kind, *extra, name, f"--from-literal=data={value}")


def by_key_id(resource: dict[str, Any]) -> dict[str, int]:
    assert {e["provider"] for e in resource["byKeyID"]} <= {"keyward"}
    return {e["keyID"]: e["objects"] for e in resource["byKeyID"]}


key_ids: list[str] = []  # the plugin's key_ids, oldest first


def test_counts_match_etcd_read_directly(cluster: Cluster):
    key_ids.append(cluster.status_key_id())
    for i in range(3):
        create(cluster, "secret", f"s-{i}")
    for i in range(2):
        create(cluster, "configmap", f"c-{i}")
    found = audit_json(cluster, "--resource", "secrets", "--resource", "configmaps", "--page-size", "2")

    secrets_direct = direct_count(cluster, "/registry/secrets/", key_ids)
    assert secrets_direct == {key_ids[0]: 3}
    s = found["secrets"]
    assert (s["keyPrefix"], s["objects"], s["plaintext"]) == ("/registry/secrets/", 3, 0)
    assert by_key_id(s) == dict(secrets_direct)

    configmaps_direct = direct_count(cluster, "/registry/configmaps/", key_ids)
    assert set(configmaps_direct) == {"plaintext"} and configmaps_direct["plaintext"] >= 2
    c = found["configmaps"]
    assert c["objects"] == c["plaintext"] == configmaps_direct["plaintext"]
    assert c["byKeyID"] == []
    for r in (s, c):
        assert (r["otherEncryption"], r["unreadable"], r["otherEncryptionByProvider"]) == (0, 0, [])


def test_the_table_shows_the_same_counts(cluster: Cluster):
    proc = audit(cluster, "--resource", "secrets", "--resource", "configmaps")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    plaintext = direct_count(cluster, "/registry/configmaps/", key_ids)["plaintext"]
    assert rows[0] == ["RESOURCE", "PROTECTION", "PROVIDER", "KEY", "ID", "OBJECTS"]
    assert rows[1] == ["secrets", "kms-v2", "keyward", key_ids[0], "3"]
    assert rows[2] == ["configmaps", "plaintext", "-", "-", str(plaintext)]
    assert rows[3] == ["TOTAL", str(3 + plaintext)]
    assert "nothing decrypted" in proc.stdout


def test_after_a_rotation_counts_split_across_two_key_ids(cluster: Cluster):
    cluster.keyward("keys", "rotate", "secrets")
    key_ids.append(
        wait_for(
            lambda: (kid := cluster.status_key_id()) != key_ids[0] and kid, timeout=15, what="the new key_id"
        )
    )
    # The apiserver adopts a new key_id on its next Status poll (about a minute); a restart does it now.
    cluster.apiserver.restart(timeout=180)
    for i in range(2):
        create(cluster, "secret", f"after-rotation-{i}")

    direct = direct_count(cluster, "/registry/secrets/", key_ids)
    assert direct == {key_ids[0]: 3, key_ids[1]: 2}
    s = audit_json(cluster)["secrets"]  # secrets is the default resource
    assert by_key_id(s) == dict(direct)
    assert [e["keyID"] for e in s["byKeyID"]] == key_ids  # v1 before v2
    assert (s["objects"], s["plaintext"]) == (5, 0)


def test_expect_key_id_fails_while_objects_remain_under_another(cluster: Cluster):
    failed = audit(cluster, "--expect-key-id", key_ids[1])
    assert failed.returncode == 1
    line = one_line_error(failed, report=True)
    assert line == f"keyward: 3 of 5 objects are not under key_id {key_ids[1]} (secrets: 3)"
    both = audit(cluster, "--expect-key-id", key_ids[0], "--expect-key-id", key_ids[1], "--fail-on-plaintext")
    assert both.returncode == 0, both.stderr
    plain = one_line_error(audit(cluster, "--resource", "configmaps", "--fail-on-plaintext"), report=True)
    assert plain.startswith("keyward: ") and "stored in plaintext (configmaps: " in plain


def test_built_in_and_custom_key_prefixes_match_what_the_apiserver_wrote(cluster: Cluster):
    cluster.kubectl("apply", "-f", str(pathlib.Path(__file__).parents[2] / "deploy" / "crds"))
    crds = "customresourcedefinitions.apiextensions.k8s.io"
    expected = {
        "services": "/registry/services/specs/",
        "namespaces": "/registry/namespaces/",
        "leases.coordination.k8s.io": "/registry/leases/",
        crds: "/registry/apiextensions.k8s.io/customresourcedefinitions/",
    }
    found = audit_json(cluster, *(arg for name in expected for arg in ("--resource", name)))
    for name, prefix in expected.items():
        assert found[name]["keyPrefix"] == prefix
        assert found[name]["objects"] == len(cluster.etcd.keys(prefix)) > 0, name


def client(cluster: Cluster) -> etcd.EtcdClient:
    return etcd.EtcdClient(
        cluster.etcd.endpoint, cluster.etcd.ca_cert, cluster.etcd.client_cert, cluster.etcd.client_key
    )


def test_a_paged_scan_is_a_snapshot_at_one_revision(cluster: Cluster):
    prefix = b"/registry/secrets/"
    c = client(cluster)
    whole = c.range(prefix, etcd.prefix_end(prefix), keys_only=True)  # one request, no limit
    assert not whole.more and len(whole.kvs) == 5
    scan = c.scan(prefix, page_size=2, keys_only=True)
    first = next(scan)
    create(cluster, "secret", "zz-written-during-the-scan")  # sorts after every key read so far
    cluster.kubectl("delete", "secret", "s-2")  # on a page not read yet
    rest = list(scan)
    assert [first.key, *(kv.key for kv in rest)] == [kv.key for kv in whole.kvs]
    now = [kv.key for kv in c.scan(prefix, page_size=2, keys_only=True)]
    assert b"/registry/secrets/default/zz-written-during-the-scan" in now
    assert b"/registry/secrets/default/s-2" not in now


def test_reading_a_compacted_revision_says_to_run_again(cluster: Cluster):
    c = client(cluster)
    old = c.current_revision(b"/registry/secrets/")
    create(cluster, "secret", "after-the-snapshot")
    cluster.etcd.compact(c.current_revision(b"/registry/secrets/"))
    with pytest.raises(etcd.EtcdError) as caught:
        list(c.scan(b"/registry/secrets/", revision=old))
    text = str(caught.value)
    assert "\n" not in text and "compacted" in text and "run again" in text


def test_unreachable_or_untrusted_etcd_is_one_line_naming_what_to_check(
    cluster: Cluster, short_tmp: pathlib.Path
):
    port = localcluster.free_port()
    line = one_line_error(audit(cluster, "--etcd-endpoints", f"https://127.0.0.1:{port}"))
    assert (
        line
        == f"keyward: nothing listens at https://127.0.0.1:{port} (connection refused): check the endpoint"
    )
    assert one_line_error(
        audit(cluster, env=etcd_env(cluster, KEYWARD_ETCD_CERT="/nonexistent/admin.crt"))
    ) == (
        "keyward: cannot read the etcd client certificate file /nonexistent/admin.crt: No such file or "
        "directory (set by --etcd-cert or KEYWARD_ETCD_CERT)"
    )
    other = localcluster.Pki(short_tmp / "other-pki")  # a CA etcd does not know
    line = one_line_error(audit(cluster, "--etcd-cacert", str(other.ca_cert)))
    assert f"does not verify against the CA file {other.ca_cert}" in line
    line = one_line_error(
        audit(cluster, "--etcd-cert", str(other.admin_cert), "--etcd-key", str(other.admin_key))
    )
    assert "check that etcd trusts the client certificate and key" in line


def test_the_first_endpoint_that_answers_is_used(cluster: Cluster):
    endpoints = f"https://127.0.0.1:{localcluster.free_port()},{cluster.etcd.endpoint}"
    proc = audit(cluster, "--json", "--etcd-endpoints", endpoints)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["etcdEndpoint"] == cluster.etcd.endpoint
