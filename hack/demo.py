"""`make demo`: the proof, on the local control plane that `make up` started.

Writes a Secret through kube-apiserver, then reads the raw bytes etcd holds for it and shows that they
carry the `k8s:enc:kms:v2:keyward:` prefix and the key_id of the HSM key version the plugin reports, that
the Secret's value appears nowhere in them, and that kubectl still reads the value back.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import secrets
import subprocess
import sys

import localcluster
from keyward import atrest
from keyward.etcd import EtcdClient, EtcdError
from kmsplugin.client import KmsClient

PREFIX = b"k8s:enc:kms:v2:keyward:"


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", type=pathlib.Path, required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--name", default="keyward-demo")
    args = parser.parse_args(argv)

    state = localcluster.State(args.state)
    if not state.all_alive():
        say("the local control plane is not running: run `make up` (or `make demo`, which starts it)")
        return 1
    facts = state.load()
    kubectl = [str(pathlib.Path(facts["bin_dir"]) / "kubectl"), f"--kubeconfig={facts['kubeconfig']}"]
    env = {**os.environ, **localcluster.token_env(facts)}

    def run(*cmd: str, show: bool = True) -> str:
        if show:
            say(f"$ {' '.join(c if ' ' not in c else repr(c) for c in cmd)}")
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            raise SystemExit(f"demo: `{' '.join(cmd[:3])} ...` failed: {out.stderr.strip()}")
        return out.stdout

    say("== 1. The key lives in the HSM token (SoftHSM2 here); the plugin serves its primary version")
    say(run(str(pathlib.Path(facts["venv_bin"]) / "keyward"), "keys", "list").rstrip())
    with KmsClient(facts["kms_socket"]) as kms:
        status = kms.status()
    say(f"plugin Status: version={status.version} healthz={status.healthz} key_id={status.key_id}")
    say("The operator manages it as an EncryptionKey (kubectl get encryptionkeys -o wide):")
    say(run(*kubectl, "get", "encryptionkeys", "-o", "wide", show=False).rstrip())
    say()

    value = f"s3cr3t-{secrets.token_hex(8)}"
    say(f"== 2. Write a Secret through kube-apiserver (value {value!r})")
    subprocess.run(
        [*kubectl, "delete", "secret", args.name, "-n", args.namespace, "--ignore-not-found"],
        capture_output=True,
        check=False,
    )
    say(
        run(
            *kubectl,
            "create",
            "secret",
            "generic",
            args.name,
            "-n",
            args.namespace,
            f"--from-literal=password={value}",
        ).rstrip()
    )
    say()

    say("== 3. Read the raw value that etcd stores (no apiserver involved)")
    key = f"/registry/secrets/{args.namespace}/{args.name}"
    raw = read_etcd(facts, key)
    found = atrest.inspect(raw)
    say(f"etcd key:          {key}")
    say(f"first bytes:       {raw[:40]!r}...")
    say(
        f"prefix:            {raw[: len(PREFIX)].decode(errors='replace')}\nstored keyID:      {found.key_id}"
    )
    say(f"plugin key_id:     {status.key_id}")
    checks = {
        "the value carries the k8s:enc:kms:v2:keyward: prefix": raw.startswith(PREFIX),
        "the stored keyID is the HSM key version the plugin reports": found.key_id == status.key_id,
        "the Secret's value is not in the raw bytes": value.encode() not in raw
        and base64.b64encode(value.encode()) not in raw,
    }
    say()
    say("== 4. Read it back through the API")
    got = run(*kubectl, "get", "secret", args.name, "-n", args.namespace, "-o", "jsonpath={.data.password}")
    decoded = base64.b64decode(got).decode()
    say(f"decoded value:     {decoded!r}")
    checks["kubectl reads back exactly what was written"] = decoded == value
    return report(checks, found.key_id)


def read_etcd(facts: dict[str, str], key: str) -> bytes:
    """The raw value etcd holds for ``key``, read with the admin's client certificate."""
    etcd = EtcdClient(facts["etcd_endpoint"], facts["etcd_cacert"], facts["etcd_cert"], facts["etcd_key"])
    try:
        raw = etcd.get(key)
    except EtcdError as exc:
        raise SystemExit(f"demo: {exc}") from None
    if raw is None:
        raise SystemExit(f"demo: {key} is not in etcd")
    return raw


def report(checks: dict[str, bool], key_id: str | None) -> int:
    say()
    for text, ok in checks.items():
        say(f"  [{'ok' if ok else 'FAILED'}] {text}")
    say()
    say('Explore it yourself:  eval "$(make -s env)"; kubectl get secrets -A; keyward keys list')
    say(json.dumps({"proof": all(checks.values()), "key_id": key_id}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
