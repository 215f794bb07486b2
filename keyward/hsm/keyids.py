"""Key names and key_ids.

A key name is a DNS-1123 label (the same rule as the EncryptionKey resource's name), so it can appear in
PKCS#11 labels, Kubernetes objects and key_ids unchanged.

A key_id names one exact version of one key, forever: ``<name>/v<version>/<24 hex>``, where the hex is the
random PKCS#11 CKA_ID of the version's key object. The random part makes a key_id unique even when a key
is deleted and created again with the same name, so an apiserver never sees a key_id reused. key_ids are
stored in etcd in clear and logged: they carry nothing secret. The longest is 63 + 12 + 24 bytes, far
below the apiserver's limit of 1024.
"""

from __future__ import annotations

import dataclasses
import re

from keyward.hsm import errors

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
OBJECT_ID_BYTES = 12
_KEY_ID_RE = re.compile(r"^(?P<name>[a-z0-9-]{1,63})/v(?P<version>[1-9][0-9]{0,9})/(?P<hex>[0-9a-f]{24})$")


def validate_name(name: str) -> str:
    """Returns the name, or raises InvalidNameError saying what is wrong with it."""
    if not NAME_RE.match(name):
        raise errors.InvalidNameError(
            f"key name {name!r} is invalid: use 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit (a DNS-1123 label)"
        )
    return name


@dataclasses.dataclass(frozen=True)
class KeyId:
    """The parts of a key_id."""

    name: str
    version: int
    object_id: bytes

    def __str__(self) -> str:
        return f"{self.name}/v{self.version}/{self.object_id.hex()}"


def format_key_id(name: str, version: int, object_id: bytes) -> str:
    return str(KeyId(name, version, object_id))


def parse_key_id(key_id: str) -> KeyId | None:
    """Returns the parts of a Keyward key_id, or None when it is not one."""
    match = _KEY_ID_RE.match(key_id)
    if not match:
        return None
    return KeyId(match["name"], int(match["version"]), bytes.fromhex(match["hex"]))


def object_label(name: str, version: int) -> str:
    """The CKA_LABEL of a version's key object: readable in HSM tools, not relied upon for lookups."""
    return f"keyward/{name}/v{version}"
