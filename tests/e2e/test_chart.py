"""The Helm chart (charts/keyward) and deploy/, rendered by the pinned helm and used on a real kube-apiserver.

The rendering tests need only helm. The others share one control plane (ChartCluster in conftest) whose
apiserver encrypts Secrets with the EncryptionConfiguration the chart renders; they install the chart with
helm and run the real operator with a token of the chart's ServiceAccount, so that the chart's RBAC is
exactly what applies to it (kubeconfig impersonation would not do: the Python client ignores it).
"""

from __future__ import annotations

import collections
import http.client
import json
import re
from pathlib import Path
from typing import Any

import pytest

import chart
from conftest import ChartCluster, ChartOperator, wait_for
from keyward import atrest

pytestmark = pytest.mark.e2e

NS = ChartCluster.NAMESPACE
OPERATOR = f"system:serviceaccount:{NS}:keyward-operator"
VALUES = [None, *chart.CI_VALUES]
NETWORK_VALUES = chart.CHART / "ci" / "network-hsm-values.yaml"


def values_id(values: Path | None) -> str:
    return values.stem if values else "default"


def rendered(values: Path | None, *set_values: str) -> list[dict[str, Any]]:
    return chart.documents(
        chart.render(values_files=[values] if values else [], set_values=set_values, namespace=NS)
    )


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod the chart describes: the Deployment's, the DaemonSet's and the static pod's."""
    pods = {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
    }
    static = chart.documents(find(docs, "ConfigMap", "keyward-node-files")["data"]["keyward-kms-plugin.yaml"])
    assert [d["kind"] for d in static] == ["Pod"]
    pods["static Pod/keyward-kms-plugin"] = static[0]["spec"]
    return pods


# --------------------------------------------------------------------------------------------------
# Rendering (helm only)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES, ids=values_id)
def test_helm_lint_and_template_pass_with_default_and_non_default_values(values):
    extra = ["--values", str(values)] if values else []
    lint = chart.helm("lint", "--strict", str(chart.CHART), *extra)
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    kinds = collections.Counter(d["kind"] for d in rendered(values))
    people = {"ClusterRole": 3, "ConfigMap": 1}
    operator = {
        "ServiceAccount": 1,
        "ClusterRole": 4,
        "ClusterRoleBinding": 1,
        "Role": 3,
        "RoleBinding": 3,
        "Deployment": 1,
        "ValidatingAdmissionPolicy": 1,
        "ValidatingAdmissionPolicyBinding": 1,
    }
    expected = {
        "default": {**people, **operator, "CustomResourceDefinition": 2},
        "network-hsm-values": {**people, **operator, "CustomResourceDefinition": 2, "DaemonSet": 1},
        "minimal-values": people,
    }[values_id(values)]
    assert dict(kinds) == expected


def test_non_default_values_reach_every_object_that_depends_on_them():
    docs = rendered(NETWORK_VALUES)
    deployment = find(docs, "Deployment", "keyward-operator")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "kw-operator"
    assert "--lease-name=kw-leader" in container["args"] and "--health-port=9090" in container["args"]
    # hsmAccess network: the PIN comes from the Secret, the vendor module from extraVolumes, no node folders.
    assert env["KEYWARD_PIN_FILE"] == "/var/run/secrets/keyward/user-pin"
    assert env["KEYWARD_PKCS11_MODULE"] == "/opt/vendor-hsm/lib/libvendorpkcs11.so"
    assert env["VENDOR_HSM_CONF"] == "/etc/keyward-hsm/vendor.conf"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pin"]["secret"]["secretName"] == "keyward-hsm-pin"
    assert [v for v in volumes if "hostPath" in volumes[v]] == ["vendor-hsm"]
    assert "nodeSelector" not in pod and pod["securityContext"]["fsGroup"] == 20000
    # The Lease RBAC names the configured Lease; every binding names the configured ServiceAccount.
    election = find(docs, "Role", "keyward-operator-leader-election")
    assert [r.get("resourceNames") for r in election["rules"]] == [None, ["kw-leader"]]
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kw-operator", "namespace": NS}]
    # reencryptResources: "configmaps" is the core group, "widgets.example.com" is widgets in example.com.
    rules = find(docs, "ClusterRole", "keyward-operator")["rules"]
    reencrypt = [(r["apiGroups"], r["resources"]) for r in rules if r["verbs"] == ["list", "patch"]]
    assert reencrypt == [([""], ["secrets"]), ([""], ["configmaps"]), (["example.com"], ["widgets"])]
    # The plugin, static or DaemonSet, serves the configured key on the configured socket.
    files = find(docs, "ConfigMap", "keyward-node-files")["data"]
    for name, spec in pod_specs(docs).items():
        if "plugin" in name:
            args = spec["containers"][0]["args"]
            assert "--socket=/var/run/kms-keyward/plugin.sock" in args and "--key=cluster-secrets" in args
    config = chart.documents(files["encryption-config-2-encrypt.yaml"])[0]
    assert config["resources"][0]["resources"] == ["secrets", "configmaps"]
    assert (
        config["resources"][0]["providers"][0]["kms"]["endpoint"] == "unix:///var/run/kms-keyward/plugin.sock"
    )
    assert config["resources"][0]["providers"][0]["kms"]["timeout"] == "5s"
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert all("annotations" not in d["metadata"] for d in crds), "crds.keep=false must drop the keep policy"


@pytest.mark.parametrize("values", VALUES, ids=values_id)
def test_every_pod_runs_non_root_read_only_without_escalation_and_never_holds_a_pin(values):
    docs = rendered(values)
    for name, spec in pod_specs(docs).items():
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["requests"], name
            assert "livenessProbe" in container, name
            names = [e["name"] for e in container["env"]]
            assert "KEYWARD_PIN" not in names and "KEYWARD_PIN_FILE" in names, name
        if "plugin" in name:
            # The plugin starts from the node alone: no API credentials, no ConfigMap or Secret volumes,
            # its own network so that it never waits for the cluster network.
            assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
            assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
            assert all(set(v) & {"hostPath", "emptyDir"} for v in spec["volumes"]), name
            container = spec["containers"][0]
            socket_arg = next(a for a in container["args"] if a.startswith("--socket="))
            assert socket_arg in container["livenessProbe"]["exec"]["command"]
        else:
            container = spec["containers"][0]
            port = next(a for a in container["args"] if a.startswith("--health-port="))
            assert container["ports"] == [{"name": "health", "containerPort": int(port.split("=")[1])}]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


REFUSALS = [
    # values.schema.json: the path of the bad value, in helm's words.
    ("hsm.pin=s3cret", "at '/hsm': additional properties 'pin' not allowed"),
    ("operator.replica=2", "at '/operator': additional properties 'replica' not allowed"),
    ("operator.replicas=-1", "at '/operator/replicas': minimum: got -1, want 0"),
    ("operator.hsmAccess=cloud", "at '/operator/hsmAccess': value must be one of 'node', 'network'"),
    ("operator.healthPort=70000", "at '/operator/healthPort': maximum"),
    ("plugin.socketPath=kms.sock", "at '/plugin/socketPath': 'kms.sock' does not match pattern"),
    ("plugin.keyName=Secrets_Key", "at '/plugin/keyName'"),
    ("encryption.providerName=key:ward", "at '/encryption/providerName'"),
    (
        "operator.reencryptResources={Secrets}",
        "at '/operator/reencryptResources/0': 'Secrets' does not match",
    ),
    # templates/_helpers.tpl (keyward.validate): rules that need a sentence.
    ("hsm.env.KEYWARD_PIN=s3cret", "hsm.env.KEYWARD_PIN: a PIN must never be an environment variable"),
    ("hsm.env.HSM_PIN=s3cret", "hsm.env.HSM_PIN: a PIN must never be an environment variable"),
    ("hsm.env.KEYWARD_PKCS11_MODULE=/x.so", "hsm.env.KEYWARD_PKCS11_MODULE is set by the chart: use hsm."),
    (
        "hsm.pinFile=/root/pin",
        "hsm.pinFile (/root/pin) must be a file inside hsm.configHostPath (/etc/keyward)",
    ),
    ("operator.hsmAccess=network", "operator.pinSecret.name is required when operator.hsmAccess is network"),
]


@pytest.mark.parametrize(("value", "message"), REFUSALS, ids=[v for v, _ in REFUSALS])
def test_bad_values_are_refused_with_a_message_naming_the_value(value, message):
    with pytest.raises(chart.HelmError) as refused:
        chart.render(set_values=[value])
    assert message in str(refused.value)
    assert "s3cret" not in str(refused.value), "a PIN was echoed"


def test_deploy_folder_and_the_charts_crd_copy_are_current():
    assert chart.stale() == [], "run `make manifests` and commit the result"


# --------------------------------------------------------------------------------------------------
# On the real apiserver
# --------------------------------------------------------------------------------------------------


def test_the_charts_encryption_configuration_makes_the_apiserver_encrypt_through_the_plugin(chart_cluster):
    c = chart_cluster
    c.kubectl("create", "secret", "generic", "chart-enc", "--from-literal=k=v", "-n", "default")
    stored = atrest.inspect(c.raw("default", "chart-enc"))
    assert stored.key_id == c.status_key_id()
    assert c.raw("default", "chart-enc").startswith(b"k8s:enc:kms:v2:keyward:")


def dry_run(c: ChartCluster, manifest: str | None = None, *files: str) -> list[str]:
    args = ["apply", "--server-side", "--force-conflicts", "--dry-run=server"]
    args += [a for f in files for a in ("-f", f)] or ["-f", "-"]
    out = c.kubectl(*args, input=manifest, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_deploy_and_every_rendering_pass_a_server_side_dry_run(chart_cluster):
    c = chart_cluster
    applied = dry_run(c, None, str(chart.DEPLOY))
    objects = chart.documents((chart.DEPLOY / "keyward.yaml").read_text())
    assert len(applied) == len(objects) and all(line.endswith("(server dry run)") for line in applied)
    for values in VALUES:
        text = chart.render(values_files=[values] if values else [], namespace=NS)
        assert len(dry_run(c, text)) == len(chart.documents(text)), values_id(values)
        static_pod = chart.node_files(text)["keyward-kms-plugin.yaml"]
        out = c.kubectl("create", "--dry-run=server", "-f", "-", input=static_pod, check=False)
        assert out.stdout.strip() == "pod/keyward-kms-plugin created (server dry run)", out.stderr


def test_a_bad_value_stops_helm_install_before_anything_is_created(chart_cluster):
    out = chart_cluster.helm(
        "install", "bad", str(chart.CHART), "-n", NS, "--set", "operator.hsmAccess=cloud", check=False
    )
    assert out.returncode != 0 and "at '/operator/hsmAccess': value must be one of" in out.stderr
    assert chart_cluster.helm("status", "bad", "-n", NS, check=False).returncode != 0


def test_helm_install_creates_the_crds_and_the_node_files(chart_installed):
    c = chart_installed
    for crd in ("encryptionkeys.keyward.io", "rotationpolicies.keyward.io"):
        got = json.loads(c.kubectl("get", "crd", crd, "-o", "json").stdout)
        assert got["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        # The chart's copy, through Helm's templating, is the schema of deploy/crds, CEL rules included.
        source = chart.documents((chart.DEPLOY / "crds" / f"keyward.io_{crd.split('.')[0]}.yaml").read_text())
        assert got["spec"]["versions"] == source[0]["spec"]["versions"]
        established = [x for x in got["status"]["conditions"] if x["type"] == "Established"]
        assert established[0]["status"] == "True"
    assert "No resources found" in c.kubectl("get", "encryptionkeys").stderr
    data = json.loads(c.kubectl("get", "configmap", "keyward-node-files", "-n", NS, "-o", "json").stdout)[
        "data"
    ]
    assert data == {p.name: p.read_text().split("\n", 1)[1] for p in (chart.DEPLOY / "node").glob("*.yaml")}


def can_i(c: ChartCluster, verb: str, what: str, *, user: str, namespace: str | None = None) -> bool:
    scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    out = c.kubectl("auth", "can-i", verb, what, f"--as={user}", *scope, check=False)
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {what}: {out.stdout}{out.stderr}"
    return answer == "yes"


ROW = re.compile(r"^\s*([^\s\[]\S*)?\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*$")


def granted(c: ChartCluster, user: str, namespace: str) -> set[tuple[str, str, str, str]]:
    """``kubectl auth can-i --list``: (resource, non-resource URL, resource name, verb) for each grant."""
    out = c.kubectl("auth", "can-i", "--list", f"--as={user}", "--namespace", namespace).stdout
    rows = set()
    for line in out.splitlines()[1:]:
        match = ROW.match(line)
        assert match, f"unexpected can-i --list line: {line!r}"
        resource, url, names, verbs = match.groups()
        rows |= {(resource or "", url, names, verb) for verb in verbs.split()}
    return rows


def grants(resource: str, *verbs: str, name: str = "", url: str = "") -> set[tuple[str, str, str, str]]:
    return {(resource, url, name, verb) for verb in verbs}


OPERATOR_EVERYWHERE = (
    grants("encryptionkeys.keyward.io", "get", "list", "watch", "patch", "update")
    | grants("encryptionkeys.keyward.io/status", "get", "patch", "update")
    | grants("rotationpolicies.keyward.io", "get", "list", "watch")
    | grants("customresourcedefinitions.apiextensions.k8s.io", "list", "watch")
    | grants("secrets", "list", "patch")
    | grants("", "get", url="/metrics")
    | grants("", "get", url="/readyz/kms-providers")
)
OPERATOR_BY_NAMESPACE = {
    NS: grants("leases.coordination.k8s.io", "create")
    | grants("leases.coordination.k8s.io", "get", "update", name="keyward-operator"),
    "kube-system": grants("leases.coordination.k8s.io", "get", "list", "watch"),
    "default": grants("events", "create") | grants("endpointslices.discovery.k8s.io", "list"),
    "kube-public": set(),
}


def test_the_operators_service_account_may_do_what_it_needs_and_nothing_more(chart_installed):
    c = chart_installed
    # Nothing beyond: every grant can-i lists, minus what any service account in the namespace has.
    nobody = f"system:serviceaccount:{NS}:nobody"
    for namespace, extra in OPERATOR_BY_NAMESPACE.items():
        beyond_baseline = granted(c, OPERATOR, namespace) - granted(c, nobody, namespace)
        assert beyond_baseline == OPERATOR_EVERYWHERE | extra, namespace
    allowed: list[tuple[str, str, str | None]] = [
        ("patch", "encryptionkeys.keyward.io", None),
        ("watch", "rotationpolicies.keyward.io", None),
        ("list", "secrets", None),
        ("patch", "secrets", "team-a"),
        ("get", "/metrics", None),
        ("get", "/readyz/kms-providers", None),
        ("update", "leases.coordination.k8s.io/keyward-operator", NS),
        ("create", "leases.coordination.k8s.io", NS),
        ("list", "leases.coordination.k8s.io", "kube-system"),
        ("list", "endpointslices.discovery.k8s.io", "default"),
        ("create", "events", "default"),
    ]
    denied: list[tuple[str, str, str | None]] = [
        ("get", "secrets", None),  # re-encryption lists and patches; reading one by name is not needed
        ("get", "secrets", "default"),
        ("update", "secrets", None),
        ("delete", "secrets", None),
        ("patch", "configmaps", None),
        ("create", "pods", NS),
        ("create", "pods", None),
        ("create", "encryptionkeys.keyward.io", None),
        ("delete", "encryptionkeys.keyward.io", None),
        ("update-spec", "encryptionkeys.keyward.io", None),
        ("patch", "rotationpolicies.keyward.io", None),
        ("update", "leases.coordination.k8s.io/someone-else", NS),
        ("delete", "leases.coordination.k8s.io/keyward-operator", NS),
        ("update", "leases.coordination.k8s.io", "kube-system"),
        ("create", "leases.coordination.k8s.io", "kube-system"),
        ("create", "leases.coordination.k8s.io", "default"),
        ("create", "events", "kube-system"),
        ("list", "endpointslices.discovery.k8s.io", "kube-system"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("impersonate", "users", None),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
    ]
    for verb, what, where in allowed:
        assert can_i(c, verb, what, user=OPERATOR, namespace=where), f"{verb} {what} in {where}"
    for verb, what, where in denied:
        assert not can_i(c, verb, what, user=OPERATOR, namespace=where), f"{verb} {what} in {where}"


POLICY = """apiVersion: keyward.io/v1alpha1
kind: RotationPolicy
metadata: {name: chart-test}
spec: {minimumRotationInterval: 1s}
"""


def encryption_key(name: str, policy: str = "chart-test") -> str:
    return (
        f"apiVersion: keyward.io/v1alpha1\nkind: EncryptionKey\nmetadata: {{name: {name}}}\n"
        f"spec: {{rotationPolicyRef: {{name: {policy}}}}}\n"
    )


def key(c: ChartCluster, name: str) -> dict[str, Any]:
    out = c.kubectl("get", "encryptionkey", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def test_the_operator_completes_a_rotation_under_exactly_the_charts_rbac(
    chart_installed: ChartCluster, chart_operator: ChartOperator
):
    c, op = chart_installed, chart_operator
    who = c.kubectl("--kubeconfig", str(op.kubeconfig), "auth", "whoami", "-o", "json").stdout
    assert json.loads(who)["status"]["userInfo"]["username"] == OPERATOR  # not the admin
    c.kubectl("apply", "-f", "-", input=POLICY + "---\n" + encryption_key("secrets"))
    wait_for(
        lambda: key(c, "secrets").get("status", {}).get("primaryVersion") == 1,
        timeout=60,
        what=f"the served key adopted\n{op.log_tail(30)}",
    )
    old_key_id = c.status_key_id()
    for i in range(20):
        c.kubectl("create", "secret", "generic", f"chart-{i}", "-n", "default", f"--from-literal=v={i}")
    c.kubectl("annotate", "encryptionkey", "secrets", "keyward.io/rotate-requested-at=chart-1", "--overwrite")
    status = wait_for(
        lambda: (s := key(c, "secrets").get("status", {})).get("primaryVersion") == 2 and s,
        timeout=60,
        what=f"status.primaryVersion 2\n{op.log_tail(30)}",
    )
    assert status["lastHandledRotateRequest"] == "chart-1"
    hsm = {k["name"]: k for k in json.loads(c.keyward("keys", "list", "--json").stdout)}["secrets"]
    assert [v["version"] for v in hsm["versions"]] == [1, 2]
    assert status["primaryKeyID"] == hsm["primaryKeyId"] != old_key_id
    wait_for(lambda: c.status_key_id() == hsm["primaryKeyId"], timeout=15, what="the plugin's Status")
    # The re-encryption completes under the same RBAC: adoption read from the identity Leases and
    # /metrics (the apiserver polls its plugin about once a minute), Secrets listed and patched.
    run = wait_for(
        lambda: (
            (r := key(c, "secrets").get("status", {}).get("reencryption") or {}).get("phase")
            in ("Succeeded", "Failed")
            and r.get("targetKeyID") == hsm["primaryKeyId"]
            and r
        ),
        timeout=150,
        what=f"the re-encryption: {key(c, 'secrets').get('status')}\n{op.log_tail(40)}",
    )
    assert run["phase"] == "Succeeded" and run["rewritten"] >= 20, run
    stored = {k: atrest.inspect(v).key_id for k, v in c.etcd.items("/registry/secrets/").items()}
    assert set(stored.values()) == {hsm["primaryKeyId"]}, stored

    # Its leader Lease is the chart's, in the chart's namespace; its Events reached namespace default.
    lease = json.loads(c.kubectl("get", "lease", "keyward-operator", "-n", NS, "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"]
    events = c.kubectl("get", "events", "-n", "default", "--field-selector", "involvedObject.name=secrets")
    assert "Rotated" in events.stdout
    # Nothing was refused on the way: a missing permission shows as a 403 or a Kopf warning.
    log = op.log_path.read_text()
    for refusal in ('"status": 403', "Forbidden", "Not enough permissions", "event.not_posted"):
        assert refusal not in log, f"{refusal!r} in the operator log:\n{op.log_tail(40)}"
    port = int(next(a for a in op.args if a.startswith("--health-port=")).split("=")[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()


PEOPLE = {"alice": "keyward-viewer", "bob": "keyward-rotator", "carol": "keyward-key-admin"}


def test_peoples_roles_separate_viewing_rotating_and_disabling_or_destroying(chart_installed):
    c = chart_installed
    for user, role in PEOPLE.items():
        c.kubectl(
            "create", "clusterrolebinding", f"chart-test-{user}", f"--clusterrole={role}", f"--user={user}"
        )
    c.kubectl("apply", "-f", "-", input=POLICY + "---\n" + encryption_key("people"))
    ek, rp = "encryptionkeys.keyward.io", "rotationpolicies.keyward.io"
    matrix = {
        # (verb, resource): alice (viewer), bob (rotator), carol (key admin)
        ("get", ek): (True, True, True),
        ("list", rp): (True, True, True),
        ("patch", ek): (False, True, True),
        ("update", ek): (False, False, True),
        ("update-spec", ek): (False, False, True),
        ("delete", ek): (False, False, True),
        ("create", ek): (False, False, True),
        ("patch", rp): (False, False, True),
        ("delete", rp): (False, False, True),
        ("get", "secrets"): (False, False, False),
    }
    for (verb, what), answers in matrix.items():
        for user, expected in zip(("alice", "bob", "carol"), answers, strict=True):
            assert can_i(c, verb, what, user=user) == expected, f"{user} {verb} {what}"
    # keyward-viewer carries the label the built-in view role aggregates; kube-controller-manager does the
    # merging, and there is none here, so the test stops at the selector matching.
    view = json.loads(c.kubectl("get", "clusterrole", "view", "-o", "json").stdout)
    viewer = json.loads(c.kubectl("get", "clusterrole", "keyward-viewer", "-o", "json").stdout)
    selectors = [s["matchLabels"] for s in view["aggregationRule"]["clusterRoleSelectors"]]
    assert any(labels.items() <= viewer["metadata"]["labels"].items() for labels in selectors)
    for role in ("keyward-rotator", "keyward-key-admin"):  # cluster-wide powers: granted explicitly only
        labels = json.loads(c.kubectl("get", "clusterrole", role, "-o", "json").stdout)["metadata"]["labels"]
        assert not any(name.startswith("rbac.authorization.k8s.io/aggregate-to") for name in labels)

    def as_user(user: str, *args: str) -> tuple[int, str]:
        out = c.kubectl(f"--as={user}", *args, check=False)
        return out.returncode, out.stdout + out.stderr

    rotate = ("annotate", "encryptionkey", "people", "keyward.io/rotate-requested-at=people-1", "--overwrite")
    code, out = as_user("alice", *rotate)
    assert code != 0 and 'User "alice" cannot patch resource "encryptionkeys"' in out
    assert as_user("bob", *rotate)[0] == 0
    # Both are patches: RBAC lets bob send this one too, the admission policy refuses it.
    destroy = '{"spec": {"versions": [{"version": 5, "state": "Destroyed"}]}}'
    repoint = '{"spec": {"rotationPolicyRef": {"name": "other"}}}'
    for patch in (destroy, repoint):
        code, out = as_user("bob", "patch", "encryptionkey", "people", "--type=merge", "-p", patch)
        assert code != 0, out
        assert "ValidatingAdmissionPolicy 'keyward-encryptionkey-spec'" in out
        assert "needs the verb update-spec on encryptionkeys.keyward.io" in out and "keyward-key-admin" in out
    assert "versions" not in key(c, "people")["spec"]
    code, out = as_user("carol", "patch", "encryptionkey", "people", "--type=merge", "-p", destroy)
    assert code == 0, out
    assert key(c, "people")["spec"]["versions"] == [{"version": 5, "state": "Destroyed"}]
    code, out = as_user("bob", "delete", "encryptionkey", "people")
    assert code != 0 and "cannot delete resource" in out


def test_helm_upgrade_keeps_every_key_and_helm_uninstall_destroys_nothing(chart_installed):
    c = chart_installed
    c.kubectl("apply", "-f", "-", input=POLICY + "---\n" + encryption_key("kept"))

    def keys() -> dict[str, str]:
        listed = json.loads(c.kubectl("get", "encryptionkeys", "-o", "json").stdout)["items"]
        return {k["metadata"]["name"]: k["metadata"]["uid"] for k in listed}

    before, hsm_before = keys(), c.keyward("keys", "list", "--json").stdout
    c.install("operator.replicas=2", "operator.logLevel=debug", command="upgrade")
    deployment = json.loads(c.kubectl("get", "deployment", "keyward-operator", "-n", NS, "-o", "json").stdout)
    assert deployment["spec"]["replicas"] == 2
    assert keys() == before and c.keyward("keys", "list", "--json").stdout == hsm_before

    out = c.helm("uninstall", ChartCluster.RELEASE, "--namespace", NS).stdout
    assert "kept due to the resource policy" in out
    assert c.kubectl("get", "clusterrole", "keyward-operator", check=False).returncode != 0
    assert c.kubectl("get", "deployment", "keyward-operator", "-n", NS, check=False).returncode != 0
    assert keys() == before  # the CRDs stayed, and so did every EncryptionKey
    assert c.keyward("keys", "list", "--json").stdout == hsm_before
    # Installing again adopts the kept CRDs.
    c.install()
    assert keys() == before


def test_the_three_steps_turn_encryption_on_for_secrets_stored_in_plaintext(chart_cluster):
    """docs/install-kubeadm.md sections 4 to 7 on one apiserver, with the chart's three files."""
    c = chart_cluster
    files = chart.node_files(chart.render(set_values=[f"plugin.socketPath={c.socket_path}"]))
    config = c.apiserver.encryption_config
    assert config is not None
    prefix = b"k8s:enc:kms:v2:keyward:"

    def use(step: str) -> None:
        config.write_text(files[step])
        c.apiserver.restart(timeout=120)

    def value(name: str) -> str:
        return c.kubectl("get", "secret", name, "-n", "default", "-o", "jsonpath={.data.k}").stdout

    try:
        c.kubectl("create", "secret", "generic", "written-encrypted", "--from-literal=k=enc", "-n", "default")
        assert c.raw("default", "written-encrypted").startswith(prefix)
        use("encryption-config-1-read.yaml")
        # Step 1 reads what another apiserver encrypted, and still writes plaintext.
        assert value("written-encrypted") == "ZW5j"
        c.kubectl("create", "secret", "generic", "written-plain", "--from-literal=k=plain", "-n", "default")
        assert not c.raw("default", "written-plain").startswith(b"k8s:enc:")

        use("encryption-config-2-encrypt.yaml")
        c.kubectl("create", "secret", "generic", "written-later", "--from-literal=k=later", "-n", "default")
        assert c.raw("default", "written-later").startswith(prefix)
        assert value("written-plain") == "cGxhaW4=" and not c.raw("default", "written-plain").startswith(
            prefix
        )
        # Re-encryption (`keyward reencrypt secrets` once it lands): every Secret written again.
        everything = c.kubectl("get", "secrets", "--all-namespaces", "-o", "json").stdout
        c.kubectl("replace", "-f", "-", input=everything)
        stored = c.etcd.items("/registry/secrets/")
        assert stored and all(raw.startswith(prefix) for raw in stored.values()), [
            key for key, raw in stored.items() if not raw.startswith(prefix)
        ]

        use("encryption-config-3-kms-only.yaml")
        assert value("written-plain") == "cGxhaW4=" and value("written-encrypted") == "ZW5j"
    finally:
        use("encryption-config-2-encrypt.yaml")
