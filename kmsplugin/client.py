"""A small client of a KMS v2 socket: what kube-apiserver does, for health checks, tests and benchmarks.

It dials the real socket, so a check through it tests the path the apiserver uses.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from keyward.wire import api_pb2, api_pb2_grpc


class KmsClient:
    def __init__(self, socket_path: str | pathlib.Path, *, timeout: float = 3.0) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        # The generated stub is untyped; the methods below give its calls their types.
        self._stub: Any = api_pb2_grpc.KeyManagementServiceStub(self._channel)  # type: ignore[no-untyped-call,unused-ignore]

    def status(self) -> api_pb2.StatusResponse:
        response: api_pb2.StatusResponse = self._stub.Status(api_pb2.StatusRequest(), timeout=self.timeout)
        return response

    def encrypt(self, plaintext: bytes, *, uid: str = "") -> api_pb2.EncryptResponse:
        request = api_pb2.EncryptRequest(plaintext=plaintext, uid=uid)
        response: api_pb2.EncryptResponse = self._stub.Encrypt(request, timeout=self.timeout)
        return response

    def decrypt(
        self,
        ciphertext: bytes,
        key_id: str,
        *,
        uid: str = "",
        annotations: Mapping[str, bytes] | None = None,
    ) -> bytes:
        request = api_pb2.DecryptRequest(
            ciphertext=ciphertext, key_id=key_id, uid=uid, annotations=dict(annotations or {})
        )
        response: api_pb2.DecryptResponse = self._stub.Decrypt(request, timeout=self.timeout)
        return response.plaintext

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
