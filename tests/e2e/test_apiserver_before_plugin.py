"""An apiserver that starts before its plugin is not ready for KMS, then heals by itself once it starts."""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import pytest

import localcluster
from conftest import run_keyward, wait_for
from keyward import atrest

pytestmark = pytest.mark.e2e


def test_readyz_fails_until_the_plugin_starts_then_secrets_can_be_written():
    base = pathlib.Path(tempfile.mkdtemp(prefix="kwl-", dir="/tmp"))
    token = localcluster.SoftHsmToken(base / "hsm")
    run_keyward(token, "keys", "create", "secrets")
    sock = base / "kms.sock"
    plugin = localcluster.Plugin(
        base / "plugin", token, sock, extra_env={"KEYWARD_STORE_LOCK": str(base / "store.lock")}
    )
    pki = localcluster.Pki(base / "pki")
    etcd = localcluster.Etcd(base / "etcd", pki)
    apiserver = localcluster.KubeApiserver(
        base / "apiserver",
        pki,
        etcd,
        encryption_config=localcluster.write_encryption_config(base / "enc.yaml", sock),
    )
    try:
        etcd.start()
        apiserver.start(timeout=180, ready_path="/readyz?exclude=kms-providers")
        code, body = apiserver.get("/readyz/kms-providers")
        assert code != 200, body
        full_code, full_body = apiserver.get("/readyz?verbose")
        assert full_code != 200 and "kms-providers failed" in full_body, full_body

        plugin.start()
        # The apiserver retries Status every 10 s while the provider is unhealthy.
        wait_for(
            lambda: apiserver.get("/readyz/kms-providers")[0] == 200,
            timeout=90,
            interval=2,
            what="/readyz/kms-providers to turn healthy",
        )
        wait_for(
            lambda: (
                apiserver.kubectl(
                    "create", "secret", "generic", "late", "--from-literal=k=v", check=False
                ).returncode
                == 0
            ),
            timeout=60,
            interval=2,
            what="a Secret write to succeed",
        )
        stored = etcd.get("/registry/secrets/default/late")
        assert stored is not None and atrest.inspect(stored).protection is atrest.Protection.KMS_V2
    except localcluster.ComponentError as exc:
        pytest.fail(exc.report())
    finally:
        for part in (apiserver, etcd, plugin):
            part.stop()
        shutil.rmtree(base, ignore_errors=True)
