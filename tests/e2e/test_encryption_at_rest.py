"""Secrets written through a real kube-apiserver are stored in etcd encrypted by Keyward's plugin.

One control plane for the module: SoftHSM2 token -> plugin -> etcd -> kube-apiserver. The tests run in
file order and build on each other's Secrets: rotation, then restarts, must leave every one readable.
"""

from __future__ import annotations

import base64
import secrets
import time

import pytest

from conftest import Cluster, wait_for
from keyward import atrest

pytestmark = pytest.mark.e2e
PREFIX = b"k8s:enc:kms:v2:keyward:"
written: dict[tuple[str, str], str] = {}


def create_secret(cluster: Cluster, namespace: str, name: str) -> str:
    value = f"value-{secrets.token_hex(12)}"
    if namespace != "default":
        cluster.kubectl("create", "namespace", namespace, check=False)
    cluster.kubectl("create", "secret", "generic", name, "-n", namespace, f"--from-literal=password={value}")
    written[(namespace, name)] = value
    return value


def read_secret(cluster: Cluster, namespace: str, name: str) -> str:
    out = cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "jsonpath={.data.password}").stdout
    return base64.b64decode(out).decode()


def assert_every_secret_reads_back(cluster: Cluster) -> None:
    for (namespace, name), value in written.items():
        assert read_secret(cluster, namespace, name) == value, f"{namespace}/{name}"


def test_a_secret_is_stored_under_the_plugins_current_key_without_plaintext(cluster: Cluster):
    value = create_secret(cluster, "default", "db-password")
    raw = cluster.raw("default", "db-password")
    assert raw.startswith(PREFIX), raw[:40]
    found = atrest.inspect(raw)
    assert found.protection is atrest.Protection.KMS_V2 and found.provider == "keyward"
    assert found.key_id == cluster.status_key_id()
    for form in (value.encode(), base64.b64encode(value.encode()), b"db-password-value"):
        assert form not in raw
    assert read_secret(cluster, "default", "db-password") == value


def test_secrets_in_many_namespaces_are_all_encrypted(cluster: Cluster):
    for i in range(3):
        create_secret(cluster, f"team-{i}", f"token-{i}")
    for i in range(3):
        assert atrest.inspect(cluster.raw(f"team-{i}", f"token-{i}")).key_id == cluster.status_key_id()


def test_after_a_rotation_new_secrets_use_the_new_key_and_old_ones_still_read(cluster: Cluster):
    old_key_id = cluster.status_key_id()
    cluster.keyward("keys", "rotate", "secrets")
    new_key_id = wait_for(
        lambda: (kid := cluster.status_key_id()) != old_key_id and kid, timeout=15, what="Status to report it"
    )
    started = time.monotonic()
    probe = 0

    def newest_secret_uses_new_key() -> bool:
        nonlocal probe
        probe += 1
        create_secret(cluster, "default", f"after-rotation-{probe}")
        return atrest.inspect(cluster.raw("default", f"after-rotation-{probe}")).key_id == new_key_id

    # The apiserver polls Status every minute while healthy, then asks for a new DEK seed by itself.
    wait_for(newest_secret_uses_new_key, timeout=150, interval=5, what="a new Secret under the new key_id")
    print(f"apiserver adopted the new key {time.monotonic() - started:.0f}s after the rotation")
    assert atrest.inspect(cluster.raw("default", "db-password")).key_id == old_key_id
    assert_every_secret_reads_back(cluster)
    assert cluster.plugin.running()


def test_restarting_the_plugin_leaves_every_secret_readable(cluster: Cluster):
    cluster.plugin.stop()
    cluster.plugin.start()
    # A write needs the plugin's Status again; reads of cached objects would pass even without it.
    wait_for(
        lambda: (
            cluster.kubectl(
                "create",
                "secret",
                "generic",
                "after-plugin-restart",
                "--from-literal=password=x",
                check=False,
            ).returncode
            == 0
        ),
        timeout=90,
        interval=2,
        what="writes after the plugin restarted",
    )
    assert_every_secret_reads_back(cluster)


def test_restarting_the_apiserver_decrypts_every_secret_again(cluster: Cluster):
    decrypts_before = cluster.plugin.log_path.read_text().count('"event": "kms.decrypt"')
    cluster.apiserver.restart(timeout=180)
    assert_every_secret_reads_back(cluster)
    # A fresh apiserver has an empty DEK cache: it had to call Decrypt to read the stored Secrets.
    assert cluster.plugin.log_path.read_text().count('"event": "kms.decrypt"') > decrypts_before


def test_a_killed_plugin_comes_back_over_its_stale_socket(cluster: Cluster):
    cluster.plugin.kill()
    assert cluster.socket_path.exists()
    cluster.plugin.start()
    value = create_secret(cluster, "default", "after-crash")
    assert read_secret(cluster, "default", "after-crash") == value
    assert atrest.inspect(cluster.raw("default", "after-crash")).protection is atrest.Protection.KMS_V2
