"""Re-encryption after a rotation: Keyward's operator against `kubectl get -o json | kubectl replace -f -`.

One real control plane (SoftHSM2, plugin, etcd, kube-apiserver) for the whole run. For each size it tops
the cluster up to N Secrets, then:

1. starts a fresh operator process, rotates the key and times the operator's re-encryption from the moment
   its status says Running to Succeeded; peak memory is the operator's VmHWM (a fresh process per size, so
   the peak belongs to that run), next to its VmHWM just before the rotation;
2. stops the operator, rotates again with the CLI, waits until the apiserver adopts the new key, and times
   the documented pipeline; peak memory is the larger of the two kubectl processes' max RSS.

Both are checked afterwards: every Secret must be under the new key_id in etcd. Prints a table. Target:
faster than the pipeline, with operator memory that does not grow with the number of Secrets.

    .venv/bin/python bench/reencrypt_throughput.py [--sizes 1000,10000] [--rate 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "hack"))

import localcluster
from keyward import atrest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATUS_METRIC = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"
# Runs a command and prints its peak RSS (KiB) on the last stderr line: kubectl's own peak, portably.
MAX_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "sys.stderr.write(f'\\nmaxrss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
    "sys.exit(code)\n"
)


class Bench:
    def __init__(self, base: pathlib.Path, rate: int) -> None:
        self.base = base
        self.token = localcluster.SoftHsmToken(base / "hsm")
        lock = {"KEYWARD_STORE_LOCK": str(self.token.dir / "store.lock")}
        self.env = {**os.environ, **self.token.env(), **lock}
        subprocess.run(
            [self.keyward, "keys", "create", "secrets"], env=self.env, check=True, capture_output=True
        )
        self.socket = base / "kms.sock"
        self.plugin = localcluster.Plugin(base / "plugin", self.token, self.socket, extra_env=lock)
        self.pki = localcluster.Pki(base / "pki")
        self.etcd = localcluster.Etcd(base / "etcd", self.pki)
        config = localcluster.write_encryption_config(base / "encryption.yaml", self.socket)
        self.apiserver = localcluster.KubeApiserver(
            base / "apiserver", self.pki, self.etcd, encryption_config=config
        )
        self.operator: localcluster.Operator | None = None
        self.rate = rate
        self.count = 0

    @property
    def keyward(self) -> str:
        return str(localcluster.default_keyward_bin())

    def start(self) -> None:
        self.plugin.start()
        self.etcd.start()
        self.apiserver.start(timeout=180)
        self.kubectl("apply", "-f", str(ROOT / "deploy" / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.kubectl("create", "namespace", "bench")
        policy = {
            "apiVersion": "keyward.io/v1alpha1",
            "kind": "RotationPolicy",
            "metadata": {"name": "bench"},
            "spec": {"minimumRotationInterval": "1s", "reencryption": {"objectsPerSecond": self.rate}},
        }
        key = {
            "apiVersion": "keyward.io/v1alpha1",
            "kind": "EncryptionKey",
            "metadata": {"name": "secrets"},
            "spec": {"rotationPolicyRef": {"name": "bench"}},
        }
        self.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy, key]})
        )

    def stop(self) -> None:
        for part in (self.operator, self.apiserver, self.etcd, self.plugin):
            if part is not None:
                part.stop()

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.apiserver.kubectl(*args, input=input).stdout

    def top_up(self, n: int) -> None:
        while self.count < n:
            batch = min(500, n - self.count)
            items = [
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": f"s{self.count + i:06d}", "namespace": "bench"},
                    "stringData": {"value": secrets.token_hex(256)},
                }
                for i in range(batch)
            ]
            self.kubectl(
                "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
            )
            self.count += batch

    def key(self) -> dict[str, Any]:
        return dict(
            json.loads(self.kubectl("get", "encryptionkey", "secrets", "-o", "json")).get("status") or {}
        )

    def stored_under(self, key_id: str) -> int:
        values = self.etcd.items("/registry/secrets/bench/")
        return sum(1 for v in values.values() if atrest.inspect(v).key_id == key_id)

    def wait(self, what: str, probe: Any, timeout: float, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = probe()
            if got:
                return got
            time.sleep(interval)
        raise RuntimeError(f"timed out waiting for {what}")

    def operator_run(self) -> dict[str, float]:
        self.operator = localcluster.Operator(
            self.base / f"operator-{self.count}",
            self.token,
            self.apiserver.kubeconfig,
            interval=1.0,
            extra_env={"KEYWARD_STORE_LOCK": str(self.token.dir / "store.lock")},
        )
        self.operator.start()
        self.wait("the operator to report the key", lambda: self.key().get("primaryKeyID"), 60)
        before_kib = vm_hwm(self.operator.pid)
        version = int(self.key()["primaryVersion"])
        self.kubectl(
            "annotate",
            "encryptionkey",
            "secrets",
            f"keyward.io/rotate-requested-at=bench-{self.count}",
            "--overwrite",
        )
        self.wait("the rotation", lambda: self.key().get("primaryVersion") == version + 1, 60)
        target = str(self.key()["primaryKeyID"])

        def phase() -> str:
            run = self.key().get("reencryption") or {}
            return str(run.get("phase")) if run.get("targetKeyID") == target else ""

        # Polled slowly: each poll is a kubectl process competing for the same CPUs. The time is the
        # operator's own measurement, from Running to the end.
        self.wait("the re-encryption to finish", lambda: phase() in ("Succeeded", "Failed"), 1800, 1.0)
        peak_kib = vm_hwm(self.operator.pid)
        run = self.key()["reencryption"]
        seconds = float(run["durationSeconds"])
        self.operator.stop()
        self.operator = None
        assert run["phase"] == "Succeeded" and run["failures"] == 0, run
        assert self.stored_under(target) == self.count, "not every Secret is under the new key"
        return {
            "seconds": seconds,
            "rate": run["seen"] / seconds,
            "peak_mib": peak_kib / 1024,
            "idle_mib": before_kib / 1024,
        }

    def kubectl_run(self) -> dict[str, float]:
        out = subprocess.run(
            [self.keyward, "keys", "rotate", "secrets"],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        target = out.stdout.strip().rsplit("key_id ", 1)[1].rstrip(")")
        wanted = "sha256:" + hashlib.sha256(target.encode()).hexdigest()
        self.wait(
            "the apiserver to adopt the new key",
            lambda: any(
                line.startswith(STATUS_METRIC) and wanted in line
                for line in self.apiserver.metrics().splitlines()
            ),
            120,
            1.0,
        )
        time.sleep(2)
        kubectl = [str(self.apiserver.bin_dir / "kubectl"), f"--kubeconfig={self.apiserver.kubeconfig}"]
        wrap = [sys.executable, "-c", MAX_RSS]
        started = time.monotonic()
        get = subprocess.Popen(
            [*wrap, *kubectl, "get", "secrets", "-A", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        replace = subprocess.Popen(
            [*wrap, *kubectl, "replace", "-f", "-"],
            stdin=get.stdout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert get.stdout is not None
        get.stdout.close()
        replace_err = replace.communicate()[1].decode()
        get_err = get.communicate()[1].decode()
        seconds = time.monotonic() - started
        if replace.returncode or get.returncode:
            raise RuntimeError(f"the kubectl pipeline failed: {get_err[-500:]} {replace_err[-500:]}")
        peak_kib = max(int(err.rsplit("maxrss ", 1)[1]) for err in (get_err, replace_err))
        assert self.stored_under(target) == self.count, "the pipeline left Secrets under the old key"
        return {"seconds": seconds, "rate": self.count / seconds, "peak_mib": peak_kib / 1024}


def vm_hwm(pid: int | None) -> int:
    """The peak resident memory of a live process, in KiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="Secret counts, comma-separated, ascending")
    parser.add_argument(
        "--rate", type=int, default=10000, help="the policy's objectsPerSecond for the operator"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    base = pathlib.Path(tempfile.mkdtemp(prefix="kwbench-", dir="/tmp"))
    bench = Bench(base, args.rate)
    rows = []
    try:
        bench.start()
        for n in sizes:
            print(f"-- {n} Secrets: creating", flush=True)
            bench.top_up(n)
            print(f"-- {n} Secrets: keyward operator", flush=True)
            ours = bench.operator_run()
            print(f"-- {n} Secrets: kubectl get | kubectl replace", flush=True)
            theirs = bench.kubectl_run()
            rows.append((n, ours, theirs))
    finally:
        bench.stop()
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(
        f"Re-encryption after a rotation, same control plane, SoftHSM2, {os.cpu_count()} CPUs; "
        f"operator rate limit {args.rate}/s"
    )
    print("| Secrets | method | seconds | Secrets/s | peak memory |")
    print("|---|---|---|---|---|")
    for n, ours, theirs in rows:
        print(
            f"| {n:,} | keyward operator | {ours['seconds']:.1f} | {ours['rate']:,.0f} | "
            f"{ours['peak_mib']:.0f} MiB (idle {ours['idle_mib']:.0f} MiB) |"
        )
        print(
            f"| {n:,} | kubectl get \\| replace | {theirs['seconds']:.1f} | {theirs['rate']:,.0f} | "
            f"{theirs['peak_mib']:.0f} MiB |"
        )
    faster = all(o["rate"] > t["rate"] for _, o, t in rows)
    growth = rows[-1][1]["peak_mib"] - rows[0][1]["peak_mib"]
    print(f"\noperator faster than the pipeline at every size: {'yes' if faster else 'NO'}")
    print(f"operator peak memory growth from {rows[0][0]:,} to {rows[-1][0]:,} Secrets: {growth:+.0f} MiB")
    return 0 if faster else 1


if __name__ == "__main__":
    sys.exit(main())
