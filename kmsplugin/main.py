"""Command line of the plugin: ``keyward plugin serve`` (also ``python -m kmsplugin``)."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmsplugin", description="Keyward's KMS v2 plugin")
    hsm_config.add_arguments(parser)
    add_arguments(parser)
    return serve(parser.parse_args(argv))
