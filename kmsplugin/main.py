"""Command line of the plugin: ``keyward plugin serve`` (also ``python -m kmsplugin``) and ``keyward plugin
check``, which asks a running plugin for its Status the way kube-apiserver does (pod probes, people).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from keyward import logs
from keyward.hsm import config as hsm_config
from keyward.hsm import errors, keyids
from kmsplugin import server

DEFAULT_SOCKET = "/var/run/keyward/kms.sock"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"Unix socket path (default {DEFAULT_SOCKET})"
    )
    parser.add_argument("--key", default="secrets", help="name of the key to serve (default: secrets)")
    parser.add_argument("--socket-group", help="make the socket 0660 and owned by this group")
    parser.add_argument(
        "--grace-period", type=float, default=10.0, help="seconds for in-flight calls on stop"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def serve(args: argparse.Namespace) -> int:
    logs.configure(args.log_level)
    try:
        keyids.validate_name(args.key)
        cfg = hsm_config.from_args(args)
        cfg.check()
    except errors.StoreError as exc:
        print(f"keyward plugin: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    settings = server.Settings(
        socket_path=pathlib.Path(args.socket),
        key_name=args.key,
        hsm=cfg,
        socket_group=args.socket_group,
        grace_seconds=args.grace_period,
    )
    return server.run(settings)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"Unix socket path (default {DEFAULT_SOCKET})"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument(
        "--require-healthy",
        action="store_true",
        help="exit 1 unless Status says healthz ok (without it: exit 0 whenever the plugin answers)",
    )


def check(args: argparse.Namespace) -> int:
    """One Status call over the socket. Exit 0 when the plugin answers (a liveness probe: a plugin whose HSM
    is down still answers, and restarting it would not help), 1 when it does not, or when
    ``--require-healthy`` is given and healthz is not ok.
    """
    import grpc

    from kmsplugin.client import KmsClient

    try:
        with KmsClient(args.socket, timeout=args.timeout) as kms:
            status = kms.status()
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        print(  # noqa: T201
            f"keyward plugin check: no Status answer on unix://{args.socket} within {args.timeout:g}s "
            f"({code}); is the plugin running and is this the socket it serves (--socket)?",
            file=sys.stderr,
        )
        return 1
    print(f"healthz={status.healthz} version={status.version} key_id={status.key_id}")  # noqa: T201
    if args.require_healthy and status.healthz != "ok":
        print(f"keyward plugin check: the plugin is not healthy: {status.healthz}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmsplugin", description="Keyward's KMS v2 plugin")
    hsm_config.add_arguments(parser)
    add_arguments(parser)
    return serve(parser.parse_args(argv))
