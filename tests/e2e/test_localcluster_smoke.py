"""Smoke test of hack/localcluster.py: a real etcd + kube-apiserver with no encryption (identity).

Proves the pieces the other e2e tests stand on: the PKI, etcd over TLS with client certs, the apiserver
becoming ready, kubectl through the admin kubeconfig, and raw etcd reads through the gRPC gateway.
"""

from __future__ import annotations

import time

import pytest

import localcluster


@pytest.mark.e2e
def test_identity_secret_is_plaintext_in_etcd(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("lc")
    bin_dir = localcluster.keyward_bin_dir()
    for binary in ("etcd", "kube-apiserver", "kubectl"):
        if not (bin_dir / binary).exists():
            pytest.fail(f"{bin_dir / binary} missing: run hack/build-binaries.sh")

    pki = localcluster.Pki(base / "pki")
    etcd = localcluster.Etcd(base / "etcd", pki, bin_dir)
    apiserver = localcluster.KubeApiserver(base / "apiserver", pki, etcd, bin_dir, encryption_config=None)
    try:
        etcd.start()
        t0 = time.monotonic()
        try:
            apiserver.start(timeout=180)
        except localcluster.ComponentError as exc:
            pytest.fail(exc.report())
        print(f"kube-apiserver ready in {time.monotonic() - t0:.1f}s")

        status, body = apiserver.get("/readyz?verbose")
        assert status == 200, body

        value = "smoke-plaintext-4f1c"
        apiserver.kubectl("create", "secret", "generic", "smoke", f"--from-literal=token={value}")
        got = apiserver.kubectl("get", "secret", "smoke", "-o", "jsonpath={.data.token}").stdout
        assert got, "kubectl returned no data"

        raw = etcd.get("/registry/secrets/default/smoke")
        assert raw is not None, f"secret not in etcd; keys: {etcd.keys('/registry/secrets/')}"
        assert not raw.startswith(b"k8s:enc:"), raw[:40]
        assert value.encode() in raw
        assert "/registry/secrets/default/smoke" in etcd.keys("/registry/secrets/default/")
        assert etcd.get("/registry/secrets/default/does-not-exist") is None
    except BaseException:
        print("--- etcd.log ---\n" + etcd.log_tail(60))
        print("--- kube-apiserver.log ---\n" + apiserver.log_tail(60))
        raise
    finally:
        apiserver.stop()
        etcd.stop()
    assert not apiserver.running()
    assert not etcd.running()
