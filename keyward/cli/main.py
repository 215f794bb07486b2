"""Entry point of the ``keyward`` command.

Errors a user can fix are printed as one line (``keyward: <what is wrong and what to do>``) with exit
code 1 (2 for usage and configuration), never as a traceback. PKCS#11 settings come from flags or the
environment (see keyward.hsm.config); the PIN never comes from a flag.
"""

from __future__ import annotations

import argparse
import logging
import sys

from keyward import logs
from keyward.hsm import config as hsm_config
from keyward.hsm import errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyward", description="Kubernetes KMS v2 with keys in your own HSM (PKCS#11)."
    )
    hsm_config.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from keyward.cli import keys

    keys.add_parser(sub)

    plugin = sub.add_parser("plugin", help="the KMS v2 plugin")
    psub = plugin.add_subparsers(dest="plugin_command", required=True, metavar="COMMAND")
    serve = psub.add_parser("serve", help="serve KMS v2 on a Unix socket")
    from kmsplugin import main as plugin_main

    plugin_main.add_arguments(serve)
    plugin_main.add_check_arguments(
        psub.add_parser("check", help="ask a running plugin for its Status, as kube-apiserver does")
    )

    operator = sub.add_parser("operator", help="the operator that reconciles EncryptionKeys")
    osub = operator.add_subparsers(dest="operator_command", required=True, metavar="COMMAND")
    from keyward_operator import main as operator_main

    operator_main.add_arguments(osub.add_parser("run", help="run the operator (needs KUBECONFIG or a pod)"))

    rotate = sub.add_parser(
        "rotate",
        help="ask the operator to rotate an EncryptionKey now",
        description="Ask the operator for a rotation (annotation keyward.io/rotate-requested-at), within the "
        "key's RotationPolicy: a request inside minimumRotationInterval waits, as the RotationRequestHandled "
        "condition says. `keyward keys rotate` rotates in the HSM directly, bypassing the policy.",
    )
    rotate.add_argument("name")
    reencrypt = sub.add_parser(
        "reencrypt",
        help="ask the operator to rewrite every object under an EncryptionKey's primary version now",
        description="Ask the operator for a re-encryption (annotation keyward.io/reencrypt-requested-at): "
        "once every apiserver uses the key's primary version, each object of the policy's "
        "spec.reencryption.resources is written again, which encrypts plaintext objects and moves old ones "
        "to the primary. Progress: kubectl get encryptionkey NAME -o jsonpath='{.status.reencryption}'.",
    )
    reencrypt.add_argument("name")

    from keyward.cli import audit

    audit.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("plugin", "operator", "audit"):
        return _on_its_own(args)
    logs.configure("warning")
    logging.getLogger("keyward.audit").setLevel(logging.INFO)
    try:
        if args.command in ("rotate", "reencrypt"):
            from keyward.cli import requests

            return requests.rotate(args.name) if args.command == "rotate" else requests.reencrypt(args.name)
        from keyward.cli import keys

        return keys.run(args)
    except (errors.ConfigurationError, errors.LoginError) as exc:
        print(f"keyward: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except errors.StoreError as exc:
        print(f"keyward: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 130


def _on_its_own(args: argparse.Namespace) -> int:
    """Commands that report their own errors: the long-running processes, which also configure their
    own logging, and ``audit``, which reads etcd only and needs no PKCS#11 setting."""
    if args.command == "audit":
        from keyward.cli import audit

        return audit.run(args)
    if args.command == "plugin":
        from kmsplugin import main as plugin_main

        if args.plugin_command == "check":
            return plugin_main.check(args)
        return plugin_main.serve(args)
    from keyward_operator import main as operator_main

    return operator_main.run(args)


if __name__ == "__main__":
    sys.exit(main())
