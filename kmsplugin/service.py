"""The KMS v2 gRPC service: Status, Encrypt and Decrypt over the key store.

Each method validates its request against the apiserver's limits, does its work through the store, checks
its own response against the same limits, and writes one audit event (uid, key_id, outcome, latency).
Every failure becomes a gRPC status whose code fits it and whose message says what is wrong:

    INVALID_ARGUMENT     empty/oversized fields, malformed or truncated ciphertext, key_id not matching it
    NOT_FOUND            key_id unknown to this plugin's key
    FAILED_PRECONDITION  the version exists but is Disabled, DestroyScheduled or Destroyed
    DATA_LOSS            AES-GCM authentication failed: the ciphertext was altered or corrupted
    UNAVAILABLE          the HSM is unreachable, timed out, or refused the PIN
    INTERNAL             anything unexpected (details only in the plugin's log)

Plaintext never appears in a message or a log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import grpc

from keyward.hsm import audit, errors
from keyward.hsm.store import KeyStore
from keyward.wire import api_pb2, api_pb2_grpc
from kmsplugin import health, keyview, limits

_log = logging.getLogger("keyward.kmsplugin")
API_VERSION = "v2"

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (limits.LimitError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.MalformedCiphertextError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.KeyIdMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.KeyNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.VersionStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AuthenticationFailedError, grpc.StatusCode.DATA_LOSS),
    (errors.HsmUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.LoginError, grpc.StatusCode.UNAVAILABLE),
    (errors.ConfigurationError, grpc.StatusCode.UNAVAILABLE),
)


def status_code(exc: Exception) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class KmsService(api_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, store: KeyStore, view: keyview.KeyView, probe: health.HealthProbe) -> None:
        self.store = store
        self.view = view
        self.probe = probe

    def Status(self, request: api_pb2.StatusRequest, context: grpc.ServicerContext) -> api_pb2.StatusResponse:
        result = self.probe.check()
        return api_pb2.StatusResponse(version=API_VERSION, healthz=result.healthz, key_id=result.key_id)

    def Encrypt(
        self, request: api_pb2.EncryptRequest, context: grpc.ServicerContext
    ) -> api_pb2.EncryptResponse:
        started = time.monotonic()
        key_id = ""
        try:
            limits.check_plaintext(request.plaintext)
            version = self.view.for_encrypt()
            key_id = version.key_id
            ciphertext = self.store.encrypt(version, request.plaintext)
            limits.check_key_id(key_id, field="response key_id")
            limits.check_ciphertext(ciphertext, field="response ciphertext")
        except Exception as exc:
            self._fail(context, "kms.encrypt", exc, uid=request.uid, key_id=key_id, started=started)
        _audit("kms.encrypt", "success", uid=request.uid, key_id=key_id, started=started)
        return api_pb2.EncryptResponse(ciphertext=ciphertext, key_id=key_id)

    def Decrypt(
        self, request: api_pb2.DecryptRequest, context: grpc.ServicerContext
    ) -> api_pb2.DecryptResponse:
        started = time.monotonic()
        try:
            limits.check_key_id(request.key_id)
            limits.check_ciphertext(request.ciphertext)
            limits.check_annotations(request.annotations)
            version = self.view.for_decrypt(request.key_id)
            plaintext = self.store.decrypt(version, request.ciphertext)
        except Exception as exc:
            self._fail(context, "kms.decrypt", exc, uid=request.uid, key_id=request.key_id, started=started)
        _audit("kms.decrypt", "success", uid=request.uid, key_id=request.key_id, started=started)
        return api_pb2.DecryptResponse(plaintext=plaintext)

    def _fail(
        self,
        context: grpc.ServicerContext,
        event: str,
        exc: Exception,
        *,
        uid: str,
        key_id: str,
        started: float,
    ) -> NoReturn:
        code = status_code(exc)
        if code is grpc.StatusCode.INTERNAL:
            _log.error("kms.internal_error", exc_info=exc, extra={"fields": {"event": event, "uid": uid}})
            message = "internal error in the KMS plugin; see the plugin's log"
        else:
            message = str(exc)
        _audit(event, type(exc).__name__, uid=uid, key_id=key_id[:200], started=started, code=code.name)
        context.abort(code, message)


def _audit(event: str, outcome: str, *, uid: str, key_id: str, started: float, **more: Any) -> None:
    latency_ms = round((time.monotonic() - started) * 1000, 3)
    audit.emit(event, outcome=outcome, uid=uid, key_id=key_id, latency_ms=latency_ms, **more)
