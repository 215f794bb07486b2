"""Builds and runs the plugin: HSM worker -> key store -> key view -> health probe -> gRPC service.

Start-up fails fast, with a clear message and exit code 2, on what only an admin can fix: a missing
PKCS#11 module, a token that is not there, a socket path in use. A wrong PIN or a missing key does *not*
stop the plugin: it serves, Status reports not-ok with the reason (visible in the apiserver's /readyz), and
it recovers by itself once the PIN file or the key is fixed, without a login retry loop.

SIGTERM or SIGINT: stop accepting calls, let in-flight calls finish within the grace period, remove the
socket, close the HSM session.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import pathlib
import signal
import threading
from types import FrameType

import grpc

from keyward.hsm import config as hsm_config
from keyward.hsm import errors, store, worker
from keyward.wire import api_pb2_grpc
from kmsplugin import health, keyview, listener, service

_log = logging.getLogger("keyward.kmsplugin")


@dataclasses.dataclass(frozen=True)
class Settings:
    socket_path: pathlib.Path
    key_name: str
    hsm: hsm_config.HsmConfig
    socket_group: str | None = None
    grace_seconds: float = 10.0
    max_workers: int = 32


class StartupError(Exception):
    """A problem only an admin can fix; the plugin exits with it."""


def build(settings: Settings) -> tuple[grpc.Server, worker.HsmWorker, health.HealthProbe]:
    hsm = worker.HsmWorker(settings.hsm)
    try:
        # Load the module and find the token now, so configuration mistakes stop start-up.
        hsm.run(lambda _session: None, timeout=30)
    except errors.ConfigurationError as exc:
        hsm.close()
        raise StartupError(str(exc)) from None
    except (errors.LoginError, errors.HsmUnavailable) as exc:
        _log.error("plugin.hsm_not_ready", extra={"fields": {"reason": str(exc)}})
    key_store = store.KeyStore(hsm)
    view = keyview.KeyView(key_store, settings.key_name)
    probe = health.HealthProbe(key_store, view)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", 64 * 1024)],
    )
    register = api_pb2_grpc.add_KeyManagementServiceServicer_to_server
    register(service.KmsService(key_store, view, probe), server)  # type: ignore[no-untyped-call]
    return server, hsm, probe


def run(settings: Settings) -> int:
    try:
        listener.prepare(settings.socket_path)
        server, hsm, probe = build(settings)
    except (listener.SocketError, StartupError) as exc:
        _log.error("plugin.startup_failed", extra={"fields": {"reason": str(exc)}})
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        _log.info("plugin.stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bound: tuple[int, int] | None = None
    try:
        with listener.private_umask():
            server.add_insecure_port(f"unix://{settings.socket_path}")
            server.start()
        bound = listener.identity(settings.socket_path)
        listener.secure(settings.socket_path, settings.socket_group)
        first = probe.check()
        _log.info(
            "plugin.serving",
            extra={
                "fields": {
                    "socket": str(settings.socket_path),
                    "key": settings.key_name,
                    "healthz": first.healthz,
                    "key_id": first.key_id,
                }
            },
        )
        stop.wait()
        server.stop(grace=settings.grace_seconds).wait()
    except listener.SocketError as exc:
        _log.error("plugin.startup_failed", extra={"fields": {"reason": str(exc)}})
        server.stop(grace=None)
        return 2
    finally:
        listener.remove(settings.socket_path, bound)
        hsm.close()
    _log.info("plugin.stopped")
    return 0
