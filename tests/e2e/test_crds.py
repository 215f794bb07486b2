"""The EncryptionKey and RotationPolicy CRDs (deploy/crds) on a real kube-apiserver.

The apiserver alone enforces everything here: the structural schemas, their defaults, and the CEL rules
(x-kubernetes-validations). Every refusal is checked for its message in kubectl's error output and for
leaving the object as it was.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import localcluster
from conftest import wait_for

pytestmark = pytest.mark.e2e

CRD_DIR = localcluster.REPO_ROOT / "deploy" / "crds"
API_VERSION = "keyward.io/v1alpha1"
# Fully qualified (also the CRDs' names), so that no other group's kinds can make a name ambiguous.
EK = "encryptionkeys.keyward.io"
RP = "rotationpolicies.keyward.io"
CRDS = (EK, RP)

DURATION_FIELDS = (
    "rotationPeriod",
    "minimumRotationInterval",
    "decryptOnlyPeriod",
    "destroyAfterDisabled",
    "destructionWindow",
)
DEFAULT_POLICY_SPEC = {
    "rotationPeriod": "90d",
    "minimumRotationInterval": "1h",
    "decryptOnlyPeriod": "7d",
    "destructionWindow": "30d",
    "reencryption": {"resources": ["secrets"], "objectsPerSecond": 200},
}
NAME_MESSAGE = (
    "metadata.name must be a DNS-1123 label of at most 63 characters (lowercase letters, digits and '-', "
    "starting and ending with a letter or digit) because it is the key's name in the HSM"
)
IMMUTABLE_MESSAGE = "algorithm is immutable; create a new EncryptionKey instead"


class Api:
    """kubectl against the module's apiserver, with the helpers every test needs."""

    def __init__(self, apiserver: localcluster.KubeApiserver) -> None:
        self.apiserver = apiserver

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.apiserver.kubectl(*args, input=input, check=check).stdout

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = json.loads(
            self.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(obj))
        )
        return created

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        out = self.kubectl("get", resource, name, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None

    def patch(self, resource: str, name: str, patch: dict[str, Any], *, status: bool = False) -> None:
        args = ["patch", resource, name, "--type", "merge", "-p", json.dumps(patch)]
        self.kubectl(*args, *(["--subresource=status"] if status else []))

    def refused(self, *args: str, input: str | None = None) -> str:
        """Run kubectl expecting the apiserver to refuse; returns kubectl's error output."""
        proc = self.apiserver.kubectl(*args, input=input, check=False)
        assert proc.returncode != 0, f"kubectl {' '.join(args)} was accepted: {proc.stdout}"
        return proc.stderr

    def refused_create(self, obj: dict[str, Any]) -> str:
        err = self.refused("create", "-f", "-", input=json.dumps(obj))
        resource = {"EncryptionKey": EK, "RotationPolicy": RP}[obj["kind"]]
        assert self.get(resource, obj["metadata"]["name"]) is None, "a refused create left an object"
        return err

    def refused_patch(self, resource: str, name: str, patch: dict[str, Any], *, status: bool = False) -> str:
        before = self.get(resource, name)
        assert before is not None, f"{resource}/{name} does not exist"
        args = ["patch", resource, name, "--type", "merge", "-p", json.dumps(patch)]
        err = self.refused(*args, *(["--subresource=status"] if status else []))
        after = self.get(resource, name)
        assert after == before, f"a refused patch changed {resource}/{name}"
        return err


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    base = pathlib.Path(tempfile.mkdtemp(prefix="kwcrd-", dir="/tmp"))
    pki = localcluster.Pki(base / "pki")
    etcd = localcluster.Etcd(base / "etcd", pki)
    apiserver = localcluster.KubeApiserver(base / "apiserver", pki, etcd, encryption_config=None)
    try:
        try:
            etcd.start()
            apiserver.start(timeout=180)
        except localcluster.ComponentError as exc:
            pytest.fail(exc.report())
        kube = Api(apiserver)
        kube.kubectl("apply", "-f", str(CRD_DIR))
        kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{c}" for c in CRDS))
        # kubectl finds the new kinds through discovery; wait until it does.
        wait_for(
            lambda: all(apiserver.kubectl("get", r, check=False).returncode == 0 for r in ("ek", "rp")),
            timeout=60,
            what="kubectl to discover the keyward.io kinds",
        )
        yield kube
    except BaseException:
        print("--- kube-apiserver.log ---\n" + apiserver.log_tail(60))
        raise
    finally:
        apiserver.stop()
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


def policy(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "RotationPolicy", "metadata": {"name": name}}
    if spec is not None:
        obj["spec"] = spec
    return obj


def key(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "EncryptionKey", "metadata": {"name": name}}
    if spec is not None:
        obj["spec"] = spec
    return obj


def unique_name(prefix: str, *parts: object) -> str:
    """``prefix`` and a short digest of ``parts``: one object per parametrized case, valid as a name."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def versions(*entries: tuple[int, str]) -> dict[str, Any]:
    """A merge patch that sets spec.versions (a merge patch replaces the whole list)."""
    return {"spec": {"versions": [{"version": v, "state": s} for v, s in entries]}}


# --------------------------------------------------------------------------------------------------
# Installation and defaults
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crd", CRDS)
def test_the_crds_install_and_become_established(api: Api, crd: str) -> None:
    obj = api.get("crd", crd)
    assert obj is not None
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions.get("Established") == "True", conditions
    assert conditions.get("NamesAccepted") == "True", conditions
    assert conditions.get("NonStructuralSchema") != "True", conditions
    spec = obj["spec"]
    assert spec["group"] == "keyward.io"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["categories"] == ["keyward"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("spec", [None, {}], ids=["no-spec", "empty-spec"])
def test_a_rotation_policy_with_an_empty_spec_gets_the_default_durations(
    api: Api, spec: dict[str, Any] | None
) -> None:
    name = unique_name("defaults", spec)
    created = api.create(policy(name, spec))
    assert created["spec"] == DEFAULT_POLICY_SPEC  # destroyAfterDisabled stays absent: never destroy
    stored = api.get(RP, name)
    assert stored is not None
    assert stored["spec"] == DEFAULT_POLICY_SPEC


@pytest.mark.parametrize(
    "spec",
    [None, {}, {"rotationPolicyRef": {"name": "fast"}, "versions": [{"version": 1, "state": "Enabled"}]}],
    ids=["no-spec", "empty-spec", "with-fields"],
)
def test_an_encryption_key_gets_the_aes256_gcm_algorithm_by_default(
    api: Api, spec: dict[str, Any] | None
) -> None:
    name = unique_name("default-alg", spec)
    created = api.create(key(name, spec))
    assert created["spec"] == {**(spec or {}), "algorithm": "AES256-GCM"}


def test_every_duration_in_the_documented_format_is_accepted(api: Api) -> None:
    spec = {
        "rotationPeriod": "90d",
        "minimumRotationInterval": "12h",
        "decryptOnlyPeriod": "1h30m",
        "destroyAfterDisabled": "20s",
        "destructionWindow": "1d2h3m4s",
    }
    defaults = {"reencryption": DEFAULT_POLICY_SPEC["reencryption"]}
    assert api.create(policy("all-formats", spec))["spec"] == {**spec, **defaults}


def test_a_63_character_key_name_is_accepted(api: Api) -> None:
    name = "k" + "0123456789" * 6 + "-z"
    assert len(name) == 63
    assert api.create(key(name))["metadata"]["name"] == name


# --------------------------------------------------------------------------------------------------
# RotationPolicy refusals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", DURATION_FIELDS)
@pytest.mark.parametrize("value", ["ninety days", "-1d", "5w", "", "1h1d", "90D"])
def test_a_rotation_policy_duration_with_a_bad_value_is_refused_with_its_message(
    api: Api, field: str, value: str
) -> None:
    name = unique_name(f"bad-{field.lower()}", value)
    err = api.refused_create(policy(name, {field: value}))
    assert f"{field} must be a duration such as 90d, 12h or 1h30m" in err, err


@pytest.mark.parametrize("field", DURATION_FIELDS)
def test_changing_a_rotation_policy_duration_to_a_bad_value_is_refused_and_changes_nothing(
    api: Api, field: str
) -> None:
    name = f"edit-{field.lower()}"
    api.create(policy(name, {"destroyAfterDisabled": "60d"}))
    err = api.refused_patch(RP, name, {"spec": {field: "5w"}})
    assert f"{field} must be a duration such as 90d, 12h or 1h30m" in err, err


# --------------------------------------------------------------------------------------------------
# EncryptionKey refusals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.b", "k" * 64, "secrets.v2"], ids=["dotted", "64-chars", "dotted-2"])
def test_an_encryption_key_name_that_is_not_a_dns_label_is_refused(api: Api, name: str) -> None:
    err = api.refused_create(key(name))
    assert NAME_MESSAGE in err, err


def test_an_unknown_algorithm_is_refused(api: Api) -> None:
    err = api.refused_create(key("unknown-alg", {"algorithm": "AES128-GCM"}))
    assert 'spec.algorithm: Unsupported value: "AES128-GCM": supported values: "AES256-GCM"' in err, err


def test_changing_the_algorithm_is_refused_and_changes_nothing(api: Api) -> None:
    api.create(key("change-alg"))
    err = api.refused_patch(EK, "change-alg", {"spec": {"algorithm": "AES128-GCM"}})
    # With one algorithm in the enum, the enum refuses every change before the CEL rule runs; the next
    # test proves the immutability rule itself.
    assert 'spec.algorithm: Unsupported value: "AES128-GCM"' in err, err


def test_the_algorithm_immutability_rule_refuses_a_change_once_a_second_algorithm_exists(api: Api) -> None:
    """A copy of the served schema under other names, its enum extended, runs the real rule."""
    served = api.get("crd", EK)
    assert served is not None
    group, plural = "immutability.keyward.test", "algorithmprobes"
    resource = f"{plural}.{group}"
    spec = served["spec"]
    # Other names too: a second kind named EncryptionKey would make `kubectl get encryptionkey` ambiguous.
    spec["group"] = group
    spec["names"] = {"kind": "AlgorithmProbe", "listKind": "AlgorithmProbeList", "plural": plural}
    schema = spec["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["properties"]["algorithm"]["enum"].append("AES128-GCM")
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": resource},
        "spec": spec,
    }
    api.kubectl("create", "-f", "-", input=json.dumps(crd))
    try:
        api.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{resource}")
        wait_for(
            lambda: api.apiserver.kubectl("get", resource, check=False).returncode == 0,
            timeout=60,
            what=f"kubectl to discover {resource}",
        )
        obj = {"apiVersion": f"{group}/v1alpha1", "kind": "AlgorithmProbe", "metadata": {"name": "probe"}}
        assert api.create(obj)["spec"] == {"algorithm": "AES256-GCM"}
        err = api.refused_patch(resource, "probe", {"spec": {"algorithm": "AES128-GCM"}})
        assert f'spec.algorithm: Invalid value: "AES128-GCM": {IMMUTABLE_MESSAGE}' in err, err
    finally:
        api.kubectl("delete", "crd", resource, "--wait=false", check=False)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"version": 0, "state": "Enabled"},
            "spec.versions[0].version: Invalid value: 0: "
            "spec.versions[0].version in body should be greater than or equal to 1",
        ),
        ({"version": -3, "state": "Disabled"}, "should be greater than or equal to 1"),
        (
            {"version": 1, "state": "Frozen"},
            'spec.versions[0].state: Unsupported value: "Frozen": '
            'supported values: "Enabled", "Disabled", "Destroyed"',
        ),
        ({"version": 1}, "spec.versions[0].state: Required value"),
        ({"state": "Enabled"}, "spec.versions[0].version: Required value"),
    ],
    ids=["version-0", "negative", "unknown-state", "no-state", "no-version"],
)
def test_a_version_entry_with_version_0_or_an_unknown_state_is_refused(
    api: Api, entry: dict[str, Any], message: str
) -> None:
    name = unique_name("bad-entry", entry)
    api.create(key(name, {"versions": [{"version": 1, "state": "Enabled"}]}))
    err = api.refused_patch(EK, name, {"spec": {"versions": [entry]}})
    assert message in err, err


DESTROYED_STATUS = {
    "status": {
        "versions": [
            {"version": 1, "keyID": "k/v1/" + "ab" * 12, "state": "Destroyed"},
            {"version": 2, "keyID": "k/v2/" + "cd" * 12, "state": "Enabled"},
        ]
    }
}


@pytest.mark.parametrize(
    "attempt",
    [versions((1, "Enabled"), (2, "Enabled")), versions((1, "Disabled"), (2, "Enabled"))],
    ids=["enable", "disable"],
)
def test_a_version_the_status_reports_destroyed_cannot_be_resurrected(
    api: Api, attempt: dict[str, Any]
) -> None:
    name = unique_name("resurrect", attempt)
    api.create(key(name))
    api.patch(EK, name, versions((1, "Destroyed"), (2, "Enabled")))
    api.patch(EK, name, DESTROYED_STATUS, status=True)
    err = api.refused_patch(EK, name, attempt)
    assert "spec.versions: Invalid value: version 1 was destroyed: destruction is permanent" in err, err


def test_a_scheduled_destruction_can_be_cancelled_while_the_status_says_it_is_not_done(api: Api) -> None:
    api.create(key("cancel-destroy"))
    api.patch(EK, "cancel-destroy", versions((1, "Destroyed"), (2, "Enabled")))
    api.patch(
        EK,
        "cancel-destroy",
        {"status": {"versions": [{"version": 1, "keyID": "k/v1/" + "ab" * 12, "state": "DestroyScheduled"}]}},
        status=True,
    )
    api.patch(EK, "cancel-destroy", versions((1, "Disabled"), (2, "Enabled")))
    obj = api.get(EK, "cancel-destroy")
    assert obj is not None and obj["spec"]["versions"][0]["state"] == "Disabled"


@pytest.mark.parametrize("state", ["Disabled", "Destroyed"])
def test_the_primary_version_cannot_be_disabled_or_destroyed(api: Api, state: str) -> None:
    name = f"primary-{state.lower()}"
    api.create(key(name))
    api.patch(EK, name, {"status": {"primaryVersion": 2}}, status=True)
    err = api.refused_patch(EK, name, versions((1, "Enabled"), (2, state)))
    assert (
        "spec.versions: Invalid value: version 2 is the primary: rotate first, then disable the old version"
        in err
    ), err
    # The old version and the primary's own Enabled entry are fine.
    api.patch(EK, name, versions((1, state), (2, "Enabled")))


def test_a_status_update_that_makes_a_spec_disabled_version_the_primary_is_refused(api: Api) -> None:
    """The rule about the primary sits at the root, so it also checks the operator's status writes.

    It does not ratchet: a root rule sees the whole object, which every write changes. The operator
    must not promote a version that spec.versions disables; other status writes still pass.
    """
    name = "promote-disabled"
    api.create(key(name, {"versions": [{"version": 3, "state": "Disabled"}]}))
    api.patch(EK, name, {"status": {"primaryVersion": 2}}, status=True)
    err = api.refused_patch(EK, name, {"status": {"primaryVersion": 3}}, status=True)
    assert "version 3 is the primary: rotate first, then disable the old version" in err, err
    api.patch(EK, name, {"status": {"primaryKeyID": "promote-disabled/v2/" + "ab" * 12}}, status=True)


# --------------------------------------------------------------------------------------------------
# kubectl get
# --------------------------------------------------------------------------------------------------


def table(output: str) -> list[list[str]]:
    """kubectl's table output as rows of cells (cells are separated by two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]


def test_kubectl_get_shows_the_printer_columns_and_the_short_names_work(api: Api) -> None:
    name = "columns"
    key_id = f"{name}/v4/" + "0123456789abcdef01234567"
    api.create(key(name))
    status = {
        "primaryVersion": 4,
        "primaryKeyID": key_id,
        "lastRotationTime": "2026-01-01T00:00:00Z",
        "nextRotationTime": "2099-01-01T00:00:00Z",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KeyReady",
                "message": "version 4 is the primary",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
            {
                "type": "Reencrypted",
                "status": "False",
                "reason": "InProgress",
                "message": "rewriting",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
        ],
    }
    api.patch(EK, name, {"status": status}, status=True)

    header, row = table(api.kubectl("get", "encryptionkeys", name))
    assert header == ["NAME", "PRIMARY", "READY", "LAST ROTATION", "NEXT ROTATION", "REENCRYPTED", "AGE"]
    cells = dict(zip(header, row, strict=True))
    assert cells["PRIMARY"] == "4"
    assert cells["READY"] == "True"
    assert cells["REENCRYPTED"] == "False"
    assert cells["NEXT ROTATION"] == "2099-01-01T00:00:00Z"  # a date column would print "<invalid>"
    assert key_id not in " ".join(row)

    header, row = table(api.kubectl("get", "encryptionkeys", name, "-o", "wide"))
    assert header == [
        "NAME",
        "PRIMARY",
        "READY",
        "LAST ROTATION",
        "NEXT ROTATION",
        "REENCRYPTED",
        "AGE",
        "KEY ID",
    ]
    assert row[-1] == key_id

    assert table(api.kubectl("get", "ek", name))[1][0] == name
    api.create(policy("short-name"))
    header, row = table(api.kubectl("get", "rp", "short-name"))
    assert header == ["NAME", "PERIOD", "MIN INTERVAL", "DECRYPT ONLY", "DESTRUCTION WINDOW", "AGE"]
    assert row[:5] == ["short-name", "90d", "1h", "7d", "30d"]
    listed = api.kubectl("get", "keyward", "-o", "name")
    assert f"encryptionkey.keyward.io/{name}" in listed
    assert "rotationpolicy.keyward.io/short-name" in listed
