"""``keyward operator run``: leader election, then Kopf reconciling EncryptionKeys against the HSM store.

The process holds one key store (one PKCS#11 session on the process's single PKCS#11 thread). It acts only
while it holds the Lease; losing it stops the process with exit code 1 so that a supervisor restarts it as
a follower.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import sys
import threading
import uuid

import kopf
from kubernetes import client

from keyward import logs
from keyward.hsm import config as hsm_config
from keyward.hsm import errors, store, worker
from keyward_operator import events, handlers, health, kubeapi, kubehttp, leadership, policies, reconciling
from keyward_operator.reencryption import adoption, objects, runner

_log = logging.getLogger("keyward.operator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "kube-system"),
        help="namespace of the leader-election Lease (env POD_NAMESPACE, default kube-system)",
    )
    parser.add_argument("--lease-name", default="keyward-operator")
    parser.add_argument(
        "--interval",
        type=float,
        default=float(os.environ.get("KEYWARD_RECONCILE_INTERVAL", "30")),
        help="seconds between periodic reconciliations (scheduled rotation and destruction)",
    )
    parser.add_argument(
        "--reencrypt-retry-after",
        type=float,
        default=float(os.environ.get("KEYWARD_REENCRYPT_RETRY_AFTER", "600")),
        help="seconds after a failed re-encryption before it is tried again (default 600)",
    )
    parser.add_argument(
        "--reencrypt-page-size",
        type=int,
        default=int(os.environ.get("KEYWARD_REENCRYPT_PAGE_SIZE", "500")),
        help="objects listed per page by a re-encryption; progress is saved after each page (default 500)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--health-port",
        type=int,
        default=int(os.environ.get("KEYWARD_HEALTH_PORT", "0")),
        help="serve GET /healthz on this TCP port for pod probes (env KEYWARD_HEALTH_PORT; default 0: off)",
    )


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level)
    try:
        cfg = hsm_config.from_args(args)
        cfg.check()
    except errors.StoreError as exc:
        print(f"keyward operator: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if not 1 <= args.reencrypt_page_size <= 10000:
        print("keyward operator: --reencrypt-page-size must be between 1 and 10000", file=sys.stderr)  # noqa: T201
        return 2
    if args.reencrypt_retry_after <= 0:
        print("keyward operator: --reencrypt-retry-after must be more than 0 seconds", file=sys.stderr)  # noqa: T201
        return 2
    kubeapi.load_config()
    key_store = store.KeyStore(worker.HsmWorker(cfg, default_timeout=30))
    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    elector = leadership.LeaderElector(
        client.CoordinationV1Api(), namespace=args.lease_namespace, identity=identity, name=args.lease_name
    )
    if args.health_port:
        # A daemon thread: it answers for as long as the process lives, and ends with it.
        try:
            health.HealthServer(args.health_port, elector.healthy).start()
        except OSError as exc:
            print(  # noqa: T201
                f"keyward operator: cannot serve /healthz on port {args.health_port}: {exc.strerror}; "
                "choose another --health-port",
                file=sys.stderr,
            )
            return 2
    stop = threading.Event()
    lost = threading.Event()
    if not elector.acquire(stop):
        return 0

    def on_lost() -> None:
        lost.set()
        stop.set()

    elector.keep(stop, on_lost)
    policy_source = kubeapi.RotationPolicies(client.CustomObjectsApi())
    reconciler = reconciling.Reconciler(key_store, policy_source)
    poster = events.EventPoster(client.CoreV1Api())
    http = kubehttp.KubeHttp()
    objects_api = objects.Objects(http)
    probe = adoption.AdoptionProbe(http, clock=store.utcnow)
    writer = runner.StatusWriter(http)

    def load_policy(ref: str | None) -> policies.Policy:
        if not ref:
            return policies.built_in()
        raw = policy_source.get(ref)
        if raw is None:
            raise policies.PolicyError(f"RotationPolicy {ref!r} does not exist")
        return policies.from_spec(ref, raw)

    def reencryptor(name: str, notify: runner.Notify) -> runner.Reencryptor:
        return runner.Reencryptor(
            name,
            objects_api=objects_api,
            probe=probe,
            writer=writer,
            notify=notify,
            load_policy=load_policy,
            clock=store.utcnow,
            retry_after=datetime.timedelta(seconds=args.reencrypt_retry_after),
            page_size=args.reencrypt_page_size,
        )

    registry = handlers.build_registry(reconciler, poster, interval=args.interval, reencryptor=reencryptor)
    _log.info("operator.started", extra={"fields": {"identity": identity, "interval": args.interval}})
    try:
        kopf.run(registry=registry, clusterwide=True, standalone=True, stop_flag=stop)
    finally:
        stop.set()
        if not lost.is_set():
            elector.release()
        key_store.hsm.close()
    return 1 if lost.is_set() else 0
