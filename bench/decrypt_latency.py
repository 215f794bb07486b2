"""Decrypt latency over the plugin's Unix socket, as kube-apiserver sees it, with 1 and 32 concurrent callers.

Starts a fresh SoftHSM2 token and a real plugin process, seals a set of DEK seeds, then times Decrypt calls
from N client threads (each a gRPC call over the socket, through the plugin's single PKCS#11 thread).
Prints a table; the targets come from the Kubernetes KMS docs (under 10 ms per Decrypt) and the
apiserver's 3 s call deadline (nothing may come near it under a burst).

    .venv/bin/python bench/decrypt_latency.py [--calls 4000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "hack"))

import localcluster
from kmsplugin.client import KmsClient

TARGET_P50_MS = 10.0
DEADLINE_MS = 3000.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(socket_path: pathlib.Path, concurrency: int, calls: int) -> dict[str, float]:
    with KmsClient(socket_path, timeout=DEADLINE_MS / 1000) as kms:
        sealed = [kms.encrypt(os.urandom(32)) for _ in range(64)]
        for s in sealed[:8]:  # warm the plugin's key-handle cache and the channel
            kms.decrypt(s.ciphertext, s.key_id)

        def one(i: int) -> float:
            s = sealed[i % len(sealed)]
            started = time.perf_counter()
            kms.decrypt(s.ciphertext, s.key_id)
            return (time.perf_counter() - started) * 1000

        wall = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(one, range(calls)))
        wall = time.perf_counter() - wall
    return {
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "rate": calls / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=4000)
    args = parser.parse_args()
    base = pathlib.Path(tempfile.mkdtemp(prefix="kwb-", dir="/tmp"))
    try:
        token = localcluster.SoftHsmToken(base / "hsm")
        env = {**os.environ, **token.env(), "KEYWARD_STORE_LOCK": str(base / "lock")}
        keyward = str(pathlib.Path(sys.executable).with_name("keyward"))
        subprocess.run([keyward, "keys", "create", "secrets"], env=env, check=True, capture_output=True)
        plugin = localcluster.Plugin(
            base / "plugin", token, base / "kms.sock", extra_env={"KEYWARD_STORE_LOCK": str(base / "lock")}
        )
        plugin.start()
        try:
            rows = [(n, measure(plugin.socket_path, n, args.calls)) for n in (1, 32)]
        finally:
            plugin.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"Decrypt over the Unix socket, SoftHSM2, {args.calls} calls per row, {os.cpu_count()} CPUs")
    print(f"{'callers':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'calls/s':>9}  target")
    ok = True
    for n, r in rows:
        # One caller is the docs' per-call target; 32 callers queue behind one PKCS#11 thread and must
        # stay far inside the apiserver's 3 s deadline.
        meets = r["p50"] < TARGET_P50_MS if n == 1 else r["max"] < DEADLINE_MS / 10
        ok = ok and meets
        target = f"p50 < {TARGET_P50_MS:g} ms" if n == 1 else f"max < {DEADLINE_MS / 10:g} ms"
        print(
            f"{n:>8} {r['p50']:>9.2f} {r['p99']:>9.2f} {r['max']:>9.2f} {r['rate']:>9.0f}  "
            f"{target}: {'met' if meets else 'MISSED'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
