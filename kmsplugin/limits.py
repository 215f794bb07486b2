"""The limits kube-apiserver enforces on a KMS v2 plugin's answers, checked here before it sees them.

The apiserver rejects (and, for Status, marks the provider unhealthy on) a key_id that is empty or longer
than 1 KiB, a ciphertext that is empty or longer than 1 KiB, and annotations whose keys are not fully
qualified domain names or whose total size passes 32 KiB. Requests are held to the same limits, so a bad
request gets a clear error instead of reaching the HSM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from keyward.hsm import store

MAX_KEY_ID = 1024
MAX_CIPHERTEXT = 1024
MAX_ANNOTATIONS = 32 * 1024
MAX_PLAINTEXT = store.MAX_PLAINTEXT  # ours, not the apiserver's: the store refuses larger plaintexts

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class LimitError(ValueError):
    """A field outside the apiserver's limits; the message names the field."""


def check_key_id(key_id: str, *, field: str = "key_id") -> None:
    if not key_id:
        raise LimitError(f"{field} is empty")
    if len(key_id.encode()) > MAX_KEY_ID:
        raise LimitError(f"{field} is {len(key_id.encode())} bytes; the limit is {MAX_KEY_ID}")


def check_ciphertext(ciphertext: bytes, *, field: str = "ciphertext") -> None:
    if not ciphertext:
        raise LimitError(f"{field} is empty")
    if len(ciphertext) > MAX_CIPHERTEXT:
        raise LimitError(f"{field} is {len(ciphertext)} bytes; the limit is {MAX_CIPHERTEXT}")


def check_plaintext(plaintext: bytes) -> None:
    if not plaintext:
        raise LimitError("plaintext is empty")
    if len(plaintext) > MAX_PLAINTEXT:
        raise LimitError(
            f"plaintext is {len(plaintext)} bytes; this plugin wraps DEK seeds of at most {MAX_PLAINTEXT}"
        )


def is_fqdn(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(_DNS_LABEL.match(label) for label in labels)


def check_annotations(annotations: Mapping[str, bytes], *, field: str = "annotations") -> None:
    total = 0
    for key, value in annotations.items():
        if not is_fqdn(key):
            raise LimitError(f"{field} key {key!r} is not a fully qualified domain name")
        total += len(key.encode()) + len(value)
    if total > MAX_ANNOTATIONS:
        raise LimitError(f"{field} are {total} bytes in total; the limit is {MAX_ANNOTATIONS}")
