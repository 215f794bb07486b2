"""``keyward keys ...``: direct key administration in the token, for admins who run no operator.

With the operator installed, prefer the EncryptionKey resource (``keyward rotate NAME``); these commands
act on the token directly and are what the operator itself builds on.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from keyward.hsm import config as hsm_config
from keyward.hsm import store, worker
from keyward.hsm.manifests import Manifest


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and rotate keys in the HSM token")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    hsm_flags = argparse.ArgumentParser(add_help=False)
    hsm_config.add_arguments(hsm_flags, suppress_defaults=True)
    p = ksub.add_parser("create", parents=[hsm_flags], help="create a key; version 1 becomes primary")
    p.add_argument("name")
    p = ksub.add_parser("list", parents=[hsm_flags], help="list keys with their versions, states and key_ids")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = ksub.add_parser("rotate", parents=[hsm_flags], help="generate a new version and make it primary")
    p.add_argument("name")
    for verb, text in (
        ("disable", "stop a version from decrypting"),
        ("enable", "let a version decrypt again"),
    ):
        p = ksub.add_parser(verb, parents=[hsm_flags], help=text)
        p.add_argument("name")
        p.add_argument("version", type=int)


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def open_store(args: argparse.Namespace) -> store.KeyStore:
    return store.KeyStore(worker.HsmWorker(hsm_config.from_args(args), default_timeout=30))


def run(args: argparse.Namespace) -> int:
    key_store = open_store(args)
    try:
        command = args.keys_command
        if command == "create":
            m = key_store.create_key(args.name, actor=actor())
            _say(f"created key {m.name}: version {m.primary} is primary ({_primary_id(m)})")
        elif command == "rotate":
            m = key_store.rotate(args.name, actor=actor())
            _say(f"rotated key {m.name}: version {m.primary} is primary ({_primary_id(m)})")
        elif command == "disable":
            key_store.disable(args.name, args.version, actor=actor())
            _say(f"disabled version {args.version} of key {args.name}: it no longer decrypts")
        elif command == "enable":
            key_store.enable(args.name, args.version, actor=actor())
            _say(f"enabled version {args.version} of key {args.name}")
        elif command == "list":
            found = key_store.manifests()
            if args.json:
                _say(
                    json.dumps([_as_json(m) for m in sorted(found.values(), key=lambda m: m.name)], indent=2)
                )
            else:
                _say(_table(found))
        return 0
    finally:
        key_store.hsm.close()


def _primary_id(m: Manifest) -> str:
    v = m.primary_version
    return "no primary" if v is None else f"key_id {v.key_id}"


def _as_json(m: Manifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "primary": m.primary,
        "primaryKeyId": None if m.primary_version is None else m.primary_version.key_id,
        "versions": [v.to_json() for v in m.versions],
    }


def _table(found: dict[str, Manifest]) -> str:
    rows = [("KEY", "VERSION", "STATE", "PRIMARY", "KEY_ID", "CREATED")]
    for m in sorted(found.values(), key=lambda m: m.name):
        for v in m.versions:
            rows.append(
                (
                    m.name,
                    str(v.version),
                    v.state.value,
                    "*" if v.version == m.primary else "",
                    v.key_id,
                    v.created_at.isoformat(),
                )
            )
    if len(rows) == 1:
        return "no keys in this token; create one with `keyward keys create NAME`"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
