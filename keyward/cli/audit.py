"""``keyward audit``: what is at rest in etcd, per resource and key_id, read from etcd directly.

It connects to etcd as an admin on a control-plane node would (endpoint, CA, client certificate), reads
each resource's objects at one etcd revision, and counts them by how they are stored: KMS v2 under which
provider and key_id, other encryption, plaintext, or unreadable. It reads only the envelope header of each
value: it never decrypts, and prints counts, never a value or an object's name. It needs no HSM settings.

A table for people, ``--json`` for machines (shape in the README); ``--expect-key-id`` and
``--fail-on-plaintext`` turn it into a check that exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from keyward import census, etcd

#: For each etcd setting: what it is, its flag, its environment variable, and where kubeadm keeps it.
SETTINGS = {
    "endpoints": (
        "etcd endpoint",
        "--etcd-endpoints",
        etcd.ENV_ENDPOINTS,
        "https://127.0.0.1:2379 on a kubeadm node",
    ),
    "cacert": (
        "etcd CA certificate",
        "--etcd-cacert",
        etcd.ENV_CACERT,
        "kubeadm: /etc/kubernetes/pki/etcd/ca.crt",
    ),
    "cert": (
        "etcd client certificate",
        "--etcd-cert",
        etcd.ENV_CERT,
        "kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt",
    ),
    "key": (
        "etcd client key",
        "--etcd-key",
        etcd.ENV_KEY,
        "kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.key",
    ),
}


def _where_set(setting: str) -> str:
    """Which flags or variables hold ``setting`` (an EtcdConfigError's), for the end of an error line."""
    names = setting.split("+")
    flags = " and ".join(SETTINGS[n][1] for n in names)
    envs = " and ".join(SETTINGS[n][2] for n in names)
    return f"set by {flags} or {envs}"


class UsageError(Exception):
    """A setting is missing or malformed: exit code 2."""


class CheckFailed(Exception):
    """The audit ran and found what --expect-key-id or --fail-on-plaintext forbid: exit code 1."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="count what is at rest in etcd per resource and key_id (reads etcd directly, never decrypts)",
        description="Count, per resource, how many objects etcd holds under each KMS v2 key_id and how many "
        "in plaintext. Connects to etcd with a client certificate, as an admin on a control-plane node "
        "would; reads envelope headers only; never decrypts; needs no HSM settings.",
    )
    for setting, (what, flag, env, _) in SETTINGS.items():
        if setting == "endpoints":
            p.add_argument(
                flag,
                metavar="URLS",
                help=f"etcd client URLs, comma-separated; the first that answers (env {env})",
            )
        else:
            p.add_argument(flag, metavar="FILE", help=f"{what} file, PEM (env {env})")
    p.add_argument(
        "--etcd-prefix",
        default="/registry",
        metavar="PREFIX",
        help="kube-apiserver's --etcd-prefix (default /registry)",
    )
    p.add_argument(
        "--resource",
        action="append",
        metavar="RESOURCE",
        help="resource to count, as in an EncryptionConfiguration: secrets (default), configmaps, "
        "widgets.example.com; repeat for several",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (shape in the README)")
    p.add_argument(
        "--expect-key-id",
        action="append",
        metavar="KEY_ID",
        help="exit 1 unless every object is KMS v2 encrypted under this key_id (repeat to allow several)",
    )
    p.add_argument("--fail-on-plaintext", action="store_true", help="exit 1 if any object is in plaintext")
    p.add_argument(
        "--page-size",
        type=_positive,
        default=etcd.DEFAULT_PAGE_SIZE,
        metavar="N",
        help=f"objects per etcd request (default {etcd.DEFAULT_PAGE_SIZE}; memory grows with it)",
    )
    p.add_argument(
        "--etcd-timeout",
        type=float,
        default=etcd.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"per etcd request (default {etcd.DEFAULT_TIMEOUT:g})",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """The command; every failure is one line on stderr: 2 for settings, 1 for etcd or a failed check."""
    try:
        client, resources = _prepare(args, os.environ if environ is None else environ)
        revision = client.current_revision(resources[0].key_prefix.encode())
        results = [
            census.take(
                r,
                (
                    kv.value
                    for kv in client.scan(r.key_prefix.encode(), revision=revision, page_size=args.page_size)
                ),
            )
            for r in resources
        ]
        prefix = census.normalize_prefix(args.etcd_prefix)
        if args.json:
            _say(json.dumps(census.document(prefix, revision, client.endpoint, results), indent=2))
        else:
            _say(table(results, revision, client.endpoint))
        check(results, expect_key_ids=args.expect_key_id or (), fail_on_plaintext=args.fail_on_plaintext)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except etcd.EtcdConfigError as exc:
        return _fail(f"{exc} ({_where_set(exc.setting)})", 2)
    except (etcd.EtcdError, CheckFailed) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    return 0


def _prepare(
    args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[etcd.EtcdClient, list[census.Resource]]:
    values: dict[str, str] = {}
    for setting, (what, flag, name, example) in SETTINGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_")) or env.get(name, "")
        if not value:
            raise UsageError(f"no {what} given: set {flag} or {name} ({example})")
        values[setting] = value
    names = list(dict.fromkeys(args.resource or ["secrets"]))  # in order, once each
    try:
        resources = [census.resource(name, args.etcd_prefix) for name in names]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    client = etcd.EtcdClient(
        values["endpoints"], values["cacert"], values["cert"], values["key"], timeout=args.etcd_timeout
    )
    return client, resources


def check(
    results: Sequence[census.Census], *, expect_key_ids: Iterable[str], fail_on_plaintext: bool
) -> None:
    """Raise CheckFailed, with one line saying how many objects and where, if a requested check fails."""
    expected = set(expect_key_ids)
    if expected:
        off = {c.resource.name: c.not_under(expected) for c in results}
        total = sum(c.objects for c in results)
        if any(off.values()):
            where = ", ".join(f"{name}: {n}" for name, n in off.items() if n)
            under = " or ".join(sorted(expected))
            raise CheckFailed(f"{sum(off.values())} of {_objects(total)} not under key_id {under} ({where})")
    if fail_on_plaintext:
        plain = {c.resource.name: c.plaintext for c in results}
        if any(plain.values()):
            where = ", ".join(f"{name}: {n}" for name, n in plain.items() if n)
            raise CheckFailed(f"{_objects(sum(plain.values()))} stored in plaintext ({where})")


HEADER = ("RESOURCE", "PROTECTION", "PROVIDER", "KEY ID", "OBJECTS")


def table(results: Sequence[census.Census], revision: int, endpoint: str) -> str:
    """Aligned columns, one row per resource and protection (KMS v2: per key_id), a total, a summary."""
    rows: list[tuple[str, ...]] = [HEADER]
    empty: list[census.Census] = []
    for c in results:
        name = c.resource.name
        for provider, key_id, n in c.key_ids():
            rows.append((name, "kms-v2", _shown(provider), _shown(key_id), str(n)))
        for provider, n in sorted(c.other.items()):
            rows.append((name, "other-encryption", _shown(provider), "-", str(n)))
        for provider, n in sorted(c.unreadable.items()):
            rows.append((name, "unreadable", _shown(provider), "-", str(n)))
        if c.plaintext:
            rows.append((name, "plaintext", "-", "-", str(c.plaintext)))
        if not c.objects:
            rows.append((name, "-", "-", "-", "0"))
            empty.append(c)
    total = sum(c.objects for c in results)
    rows.append(("TOTAL", "", "", "", str(total)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            [
                *(cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True)),
                row[-1].rjust(widths[-1]),
            ]
        )
        for row in rows
    ]
    lines.append(
        f"\nread at etcd revision {revision} from {endpoint}; envelope headers only, nothing decrypted"
    )
    lines += [
        f"note: no {c.resource.name} under {c.resource.key_prefix}: check the resource name "
        "(plural, with its API group) and --etcd-prefix"
        for c in empty
    ]
    return "\n".join(lines)


def _objects(n: int) -> str:
    return "1 object is" if n == 1 else f"{n} objects are"


def _shown(text: str) -> str:
    """Text from etcd as it may safely go to a terminal (no control characters), "-" when empty."""
    if not text:
        return "-"
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"keyward: {message}\n")
    return code
