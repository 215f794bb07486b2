"""The ciphertext format Keyward returns to kube-apiserver (pure functions, no HSM calls).

Layout, 71 bytes for the apiserver's 32-byte DEK seed::

    b"KW"  format(1)  key_id_tag(8)  nonce(12)  AES-256-GCM ciphertext || tag(16)

- ``format`` is 1. A future format gets a new number; readers reject numbers they do not know.
- ``key_id_tag`` is the first 8 bytes of SHA-256 of the key_id the data was sealed under, so a ciphertext
  presented with another key_id is told apart from a tampered one *before* the HSM is asked.
- ``nonce`` is fresh and random for every call (the HSM encrypts; we choose the nonce so that it is part
  of the format and never depends on the token's behaviour).
- The additional authenticated data binds the header and the full key_id, so changing either one makes
  the GCM tag check fail inside the HSM.
"""

from __future__ import annotations

import dataclasses
import hashlib

from keyward.hsm import errors

MAGIC = b"KW"
FORMAT_V1 = 1
TAG_LEN = 8
NONCE_LEN = 12
GCM_TAG_LEN = 16
HEADER_LEN = len(MAGIC) + 1 + TAG_LEN + NONCE_LEN
MIN_LEN = HEADER_LEN + GCM_TAG_LEN
_AAD_CONTEXT = b"keyward/kms/v1\x00"


def key_id_tag(key_id: str) -> bytes:
    return hashlib.sha256(key_id.encode()).digest()[:TAG_LEN]


@dataclasses.dataclass(frozen=True)
class Sealed:
    """A parsed ciphertext."""

    header: bytes
    key_id_tag: bytes
    nonce: bytes
    body: bytes  # GCM ciphertext followed by its 16-byte tag


def header(key_id: str, nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 12 bytes")
    return MAGIC + bytes([FORMAT_V1]) + key_id_tag(key_id) + nonce


def aad(header_bytes: bytes, key_id: str) -> bytes:
    return _AAD_CONTEXT + header_bytes + key_id.encode()


def parse(ciphertext: bytes) -> Sealed:
    """Splits a ciphertext into its parts, or raises MalformedCiphertextError saying what is wrong."""
    if len(ciphertext) < len(MAGIC) + 1 or ciphertext[: len(MAGIC)] != MAGIC:
        raise errors.MalformedCiphertextError("ciphertext is not in Keyward's format (bad magic bytes)")
    fmt = ciphertext[len(MAGIC)]
    if fmt != FORMAT_V1:
        raise errors.MalformedCiphertextError(
            f"ciphertext format {fmt} is not supported by this plugin (supported: {FORMAT_V1})"
        )
    if len(ciphertext) < MIN_LEN:
        raise errors.MalformedCiphertextError(
            f"ciphertext is truncated: {len(ciphertext)} bytes, at least {MIN_LEN} expected"
        )
    tag_start = len(MAGIC) + 1
    return Sealed(
        header=ciphertext[:HEADER_LEN],
        key_id_tag=ciphertext[tag_start : tag_start + TAG_LEN],
        nonce=ciphertext[tag_start + TAG_LEN : HEADER_LEN],
        body=ciphertext[HEADER_LEN:],
    )


def check_key_id(sealed: Sealed, key_id: str) -> None:
    """Raises KeyIdMismatchError when the ciphertext was not sealed under key_id."""
    if sealed.key_id_tag != key_id_tag(key_id):
        raise errors.KeyIdMismatchError(
            f"ciphertext was not made under key_id {key_id!r}: it belongs to another key version"
        )
