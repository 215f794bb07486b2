"""Errors of the HSM-backed key store.

Every PKCS#11 failure is translated here, at the boundary, into one of these, chaining the original with
``from exc``. Messages say what is wrong and what to do; they never contain a PIN, plaintext or key
material. The hierarchy::

    StoreError
    ├── ConfigurationError      module, token or PIN source unusable: fix the settings, restart
    ├── LoginError              the token refused the PIN (never retried automatically)
    ├── HsmUnavailable          the token stopped answering or timed out: may pass
    ├── InvalidNameError        a key name that is not a DNS-1123 label
    ├── KeyExistsError          create of a key that exists
    ├── KeyNotFoundError        no such key, or no such key_id
    ├── VersionStateError       the version exists but its state forbids the operation
    ├── StoreConflictError      another writer changed the key at the same time: read again and retry
    └── CiphertextError         ciphertext cannot be used
        ├── MalformedCiphertextError    not our format, or truncated
        ├── KeyIdMismatchError          made under another version than the key_id names
        └── AuthenticationFailedError   integrity check failed: tampered or corrupted
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every key store error."""


class ConfigurationError(StoreError):
    """The PKCS#11 module, token or PIN source cannot be used as configured."""


class LoginError(StoreError):
    """The token refused the PIN. Retrying with the same PIN could lock the token, so nothing retries."""


class HsmUnavailable(StoreError):
    """The token did not answer, or answered with a device or session failure that may pass."""


class InvalidNameError(StoreError):
    """A key name that Keyward does not accept."""


class KeyExistsError(StoreError):
    """The key already exists."""


class KeyNotFoundError(StoreError):
    """No such key, version or key_id."""


class VersionStateError(StoreError):
    """The version's state forbids the operation (for example decrypting with a disabled version)."""


class StoreConflictError(StoreError):
    """Another writer changed the key's manifest concurrently."""


class CiphertextError(StoreError):
    """The ciphertext cannot be decrypted."""


class MalformedCiphertextError(CiphertextError):
    """The bytes are not a Keyward ciphertext, or are truncated."""


class KeyIdMismatchError(CiphertextError):
    """The ciphertext was made under a different version than the key_id given with it."""


class AuthenticationFailedError(CiphertextError):
    """AES-GCM authentication failed: the ciphertext or its key_id binding was altered."""
