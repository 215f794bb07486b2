"""Fixtures shared by every test: a fresh SoftHSM2 token per test, the CLI, the plugin as a process.

Everything is real: SoftHSM2 tokens made with softhsm2-util in temporary folders, the `keyward` console
script and the plugin started as subprocesses, calls over the plugin's real Unix socket. Temporary folders
sit directly under /tmp because a Unix socket path must stay under 108 bytes.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import chart
import localcluster

KEYWARD = pathlib.Path(sys.executable).with_name("keyward")


@pytest.fixture
def short_tmp() -> Iterator[pathlib.Path]:
    path = pathlib.Path(tempfile.mkdtemp(prefix="kw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_keyward(
    token: localcluster.SoftHsmToken, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **token.env(), "KEYWARD_STORE_LOCK": str(token.dir / "store.lock")}
    proc = subprocess.run(
        [str(KEYWARD), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"keyward {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture
def token(short_tmp: pathlib.Path) -> localcluster.SoftHsmToken:
    """A fresh token holding the key `secrets` (version 1 primary)."""
    tok = localcluster.SoftHsmToken(short_tmp / "hsm")
    run_keyward(tok, "keys", "create", "secrets")
    return tok


@pytest.fixture
def keyward(token: localcluster.SoftHsmToken) -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_keyward(token, *args, check=check)

    return call


@pytest.fixture
def start_plugin(short_tmp: pathlib.Path, token: localcluster.SoftHsmToken) -> Iterator[Callable[..., Any]]:
    started: list[localcluster.Plugin] = []

    def start(
        *,
        name: str = "p",
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
        key_name: str = "secrets",
    ) -> localcluster.Plugin:
        plugin = localcluster.Plugin(
            short_tmp / name,
            token,
            short_tmp / f"{name}.sock",
            key_name=key_name,
            extra_env={"KEYWARD_STORE_LOCK": str(token.dir / "store.lock"), **(extra_env or {})},
        )
        started.append(plugin)
        if wait:
            plugin.start()
        else:
            plugin.spawn()
        return plugin

    yield start
    for plugin in started:
        plugin.stop()


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Polls ``condition`` until it returns something truthy, or fails the test saying what was awaited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def etcd_env(cluster: Cluster, **overrides: str) -> dict[str, str]:
    """The environment minus every Keyward and SoftHSM2 setting, plus the etcd ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYWARD_", "SOFTHSM2"))}
    env.update(
        KEYWARD_ETCD_ENDPOINTS=cluster.etcd.endpoint,
        KEYWARD_ETCD_CACERT=str(cluster.etcd.ca_cert),
        KEYWARD_ETCD_CERT=str(cluster.etcd.client_cert),
        KEYWARD_ETCD_KEY=str(cluster.etcd.client_key),
    )
    env.update(overrides)
    return env


C = TypeVar("C", bound="Cluster")


class Cluster:
    """A real control plane: SoftHSM2 token -> plugin -> etcd -> kube-apiserver encrypting secrets."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.token = localcluster.SoftHsmToken(base / "hsm")
        run_keyward(self.token, "keys", "create", "secrets")
        self.socket_path = base / "kms.sock"
        self.plugin = localcluster.Plugin(
            base / "plugin",
            self.token,
            self.socket_path,
            extra_env={"KEYWARD_STORE_LOCK": str(self.token.dir / "store.lock")},
        )
        self.pki = localcluster.Pki(base / "pki")
        self.etcd = localcluster.Etcd(base / "etcd", self.pki)
        config = localcluster.write_encryption_config(base / "encryption.yaml", self.socket_path)
        self.apiserver = localcluster.KubeApiserver(
            base / "apiserver", self.pki, self.etcd, encryption_config=config
        )

    def start(self) -> None:
        try:
            self.plugin.start()
            self.etcd.start()
            self.apiserver.start(timeout=180)
        except localcluster.ComponentError as exc:
            self.stop()
            pytest.fail(exc.report())

    def stop(self) -> None:
        for part in (self.apiserver, self.etcd, self.plugin):
            part.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.log_tail(40)}" for p in (self.plugin, self.apiserver, self.etcd)
        )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.apiserver.kubectl(*args, input=input, check=check)

    def keyward(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_keyward(self.token, *args, check=check)

    def raw(self, namespace: str, name: str) -> bytes:
        value = self.etcd.get(f"/registry/secrets/{namespace}/{name}")
        assert value is not None, f"secret {namespace}/{name} is not in etcd"
        return value

    def status_key_id(self) -> str:
        from kmsplugin.client import KmsClient

        with KmsClient(self.socket_path) as kms:
            status = kms.status()
        assert status.healthz == "ok", status.healthz
        return status.key_id


def running(kind: type[C], prefix: str) -> Iterator[C]:
    """Starts a control plane of ``kind`` in a fresh short folder, yields it, stops and removes it."""
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    c = kind(base)
    c.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from running(Cluster, "kwc-")


CRDS = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "crds"


class OperatorCluster(Cluster):
    """A Cluster with Keyward's CRDs installed and the operator running against the same token."""

    def __init__(self, base: pathlib.Path) -> None:
        super().__init__(base)
        self.operator = self.new_operator("operator")

    def new_operator(self, name: str, **extra_env: str) -> localcluster.Operator:
        return localcluster.Operator(
            self.base / name,
            self.token,
            self.apiserver.kubeconfig,
            interval=1.0,
            extra_env={"KEYWARD_STORE_LOCK": str(self.token.dir / "store.lock"), **extra_env},
        )

    def start(self) -> None:
        super().start()
        self.kubectl("apply", "-f", str(CRDS))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.operator.start()

    def stop(self) -> None:
        self.operator.stop()
        super().stop()

    def logs(self) -> str:
        return f"--- operator ---\n{self.operator.log_tail(60)}\n" + super().logs()

    def apply(self, manifest: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "-f", "-", input=manifest, check=check)

    def key(self, name: str) -> dict[str, Any]:
        import json

        out = self.kubectl("get", "encryptionkey", name, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def hsm_keys(self) -> dict[str, Any]:
        import json

        return {k["name"]: k for k in json.loads(self.keyward("keys", "list", "--json").stdout)}

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        for c in self.key(name).get("status", {}).get("conditions", []):
            if c["type"] == ctype:
                return dict(c)
        return {}


@pytest.fixture(scope="module")
def operator_cluster() -> Iterator[OperatorCluster]:
    yield from running(OperatorCluster, "kwo-")


class ChartOperator(localcluster.Operator):
    """The operator as the chart's Deployment runs it: its container args, as its ServiceAccount.

    The environment is the Deployment's, with the node paths it names (module, PIN file, SoftHSM2
    configuration, lock file) replaced by this test token's.
    """

    def __init__(
        self,
        dir: pathlib.Path,
        token: localcluster.SoftHsmToken,
        kubeconfig: pathlib.Path,
        container: dict[str, Any],
        namespace: str,
    ) -> None:
        super().__init__(dir, token, kubeconfig)
        self.args = [str(a) for a in container["args"]]
        names = {e["name"] for e in container["env"]}
        local = {
            **token.env(),
            "KEYWARD_STORE_LOCK": str(token.dir / "store.lock"),
            "POD_NAMESPACE": namespace,
        }
        unknown = names - local.keys()
        assert not unknown, f"the chart's operator reads environment this test cannot stand in for: {unknown}"
        self.extra_env = {name: local[name] for name in names}

    def command(self) -> list[str]:
        return [str(self.keyward_bin), *self.args]


class ChartCluster(Cluster):
    """A Cluster whose kube-apiserver encrypts Secrets with the chart's EncryptionConfiguration.

    Nothing of Keyward's is installed in it but the namespace ``keyward``: the tests install the chart
    (:meth:`install`) and run the operator as the chart's ServiceAccount (:meth:`new_operator`).
    """

    NAMESPACE = "keyward"
    RELEASE = "keyward"

    def __init__(self, base: pathlib.Path) -> None:
        super().__init__(base)
        rendered = chart.render(set_values=[f"plugin.socketPath={self.socket_path}"])
        self.encryption_config = chart.node_files(rendered)["encryption-config-2-encrypt.yaml"]
        assert self.apiserver.encryption_config is not None
        self.apiserver.encryption_config.write_text(self.encryption_config)
        #: What the tests install with: fast reconciliation and a /healthz port of our own.
        self.values = ["operator.reconcileInterval=1", f"operator.healthPort={localcluster.free_port()}"]

    def start(self) -> None:
        super().start()
        self.kubectl("create", "namespace", self.NAMESPACE)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return chart.helm(*args, "--kubeconfig", str(self.apiserver.kubeconfig), check=check)

    def install(self, *extra_values: str, command: str = "install") -> subprocess.CompletedProcess[str]:
        """``helm install`` (or ``upgrade``) of charts/keyward as release keyward in namespace keyward."""
        sets = [arg for value in (*self.values, *extra_values) for arg in ("--set", value)]
        return self.helm(command, self.RELEASE, str(chart.CHART), "--namespace", self.NAMESPACE, *sets)

    def installed(self) -> bool:
        return self.helm("status", self.RELEASE, "--namespace", self.NAMESPACE, check=False).returncode == 0

    def manifest(self) -> list[dict[str, Any]]:
        """The objects of the installed release, as Helm recorded them."""
        out = self.helm("get", "manifest", self.RELEASE, "--namespace", self.NAMESPACE).stdout
        return chart.documents(out)

    def service_account_kubeconfig(self, name: str, path: pathlib.Path) -> pathlib.Path:
        """A kubeconfig with a fresh token of ServiceAccount ``name`` in the chart's namespace."""
        token = self.kubectl("create", "token", name, "--namespace", self.NAMESPACE, "--duration=1h").stdout
        user = f"system:serviceaccount:{self.NAMESPACE}:{name}"
        localcluster.write_token_kubeconfig(
            path, self.apiserver.url, self.pki.ca_cert, user_name=user, token=token.strip()
        )
        return path

    def new_operator(self, name: str = "chart-operator") -> ChartOperator:
        """The installed Deployment's operator, authenticated as its ServiceAccount (not started)."""
        deployment = next(
            o
            for o in self.manifest()
            if o["kind"] == "Deployment" and o["metadata"]["name"] == "keyward-operator"
        )
        pod = deployment["spec"]["template"]["spec"]
        kubeconfig = self.service_account_kubeconfig(
            pod["serviceAccountName"], self.base / f"{name}.kubeconfig"
        )
        return ChartOperator(self.base / name, self.token, kubeconfig, pod["containers"][0], self.NAMESPACE)


@pytest.fixture(scope="module")
def chart_cluster() -> Iterator[ChartCluster]:
    yield from running(ChartCluster, "kwh-")


@pytest.fixture(scope="module")
def chart_installed(chart_cluster: ChartCluster) -> ChartCluster:
    """The chart installed with the test values (once per module), CRDs established."""
    if not chart_cluster.installed():
        chart_cluster.install()
        chart_cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    return chart_cluster


@pytest.fixture
def chart_operator(chart_installed: ChartCluster) -> Iterator[ChartOperator]:
    """The operator under exactly the chart's RBAC (its ServiceAccount's token); stopped after the test."""
    operator = chart_installed.new_operator()
    try:
        operator.start()
    except localcluster.ComponentError as exc:
        pytest.fail(exc.report())
    try:
        yield operator
    finally:
        operator.stop()
