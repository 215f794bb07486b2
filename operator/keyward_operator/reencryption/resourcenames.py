"""Resource names as an EncryptionConfiguration writes them: ``secrets``, ``widgets.example.com`` (pure)."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ResourceError(ValueError):
    """A resource name that is malformed, not served, or cannot be listed and patched."""


def split(resource: str) -> tuple[str, str]:
    """``widgets.example.com`` -> (``widgets``, ``example.com``); ``secrets`` -> (``secrets``, "")."""
    if len(resource) > 253 or not _NAME.match(resource):
        raise ResourceError(
            f"{resource!r} is not a resource name; use the plural, lower case, with the API group for "
            "non-core resources (secrets, configmaps, widgets.example.com)"
        )
    plural, _, group = resource.partition(".")
    return plural, group
