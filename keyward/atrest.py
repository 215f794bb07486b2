"""Reading what kube-apiserver stored in etcd, without decrypting it.

An encrypted value is ``k8s:enc:kms:v2:<provider>:`` followed by a protobuf EncryptedObject whose header
names the keyID that protects it. This module tells, for one raw etcd value, whether it is KMS v2
encrypted (and under which provider and key_id), encrypted some other way, or stored in plaintext. It is
what the demo shows, what the tests check, and what an at-rest audit counts.
"""

from __future__ import annotations

import dataclasses
import enum

from google.protobuf.message import DecodeError

from keyward.wire import envelope_pb2

KMS_V2_PREFIX = b"k8s:enc:kms:v2:"
_OTHER_PREFIX = b"k8s:enc:"


class Protection(enum.StrEnum):
    KMS_V2 = "kms-v2"
    OTHER = "other-encryption"  # aescbc, aesgcm, secretbox, kms v1...
    PLAINTEXT = "plaintext"
    UNREADABLE = "unreadable"  # has the KMS v2 prefix but no valid EncryptedObject


@dataclasses.dataclass(frozen=True)
class AtRest:
    protection: Protection
    provider: str | None = None
    key_id: str | None = None
    annotations: tuple[str, ...] = ()


def inspect(value: bytes) -> AtRest:
    if value.startswith(KMS_V2_PREFIX):
        provider, sep, payload = value[len(KMS_V2_PREFIX) :].partition(b":")
        if not sep:
            return AtRest(Protection.UNREADABLE)
        obj = envelope_pb2.EncryptedObject()
        try:
            obj.ParseFromString(payload)
        except DecodeError:
            return AtRest(Protection.UNREADABLE, provider=provider.decode(errors="replace"))
        return AtRest(
            Protection.KMS_V2,
            provider=provider.decode(errors="replace"),
            key_id=obj.keyID,
            annotations=tuple(sorted(obj.annotations)),
        )
    if value.startswith(_OTHER_PREFIX):
        return AtRest(Protection.OTHER, provider=value.split(b":")[2].decode(errors="replace"))
    return AtRest(Protection.PLAINTEXT)
