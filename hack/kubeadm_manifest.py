"""Wire Keyward into a kubeadm kube-apiserver static-pod manifest: the edit docs/install-kubeadm.md describes.

Adds to the kube-apiserver container the flags ``--encryption-provider-config`` and
``--encryption-provider-config-automatic-reload=true`` (so that later steps only replace the file), and
mounts two node folders: the one holding the EncryptionConfiguration (read-only) and the plugin's socket
folder. Applying it twice changes nothing. hack/kind/keyward-kind.sh uses it on the kind node; on a real
node the same three additions can be made by hand.

    python hack/kubeadm_manifest.py < kube-apiserver.yaml > kube-apiserver.new.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

CONFIG_DIR = "/etc/kubernetes/keyward"
CONFIG_FILE = "encryption-config.yaml"
SOCKET_DIR = "/var/run/keyward"
FLAG = "--encryption-provider-config"


def add_encryption(
    manifest: dict[str, Any], *, config_dir: str = CONFIG_DIR, socket_dir: str = SOCKET_DIR
) -> dict[str, Any]:
    """The manifest with Keyward's flags and mounts (a changed copy; the argument is left alone)."""
    if manifest.get("kind") != "Pod":
        raise ValueError(f"expected the kube-apiserver static Pod, got kind {manifest.get('kind')!r}")
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(manifest))
    spec = out["spec"]
    containers = [c for c in spec.get("containers", []) if c.get("name") == "kube-apiserver"]
    if len(containers) != 1:
        raise ValueError("no container named kube-apiserver in the manifest")
    container = containers[0]
    command = [a for a in container.get("command", []) if not a.startswith(FLAG)]
    if not command or command[0] != "kube-apiserver":
        raise ValueError("the kube-apiserver container's command does not start with kube-apiserver")
    container["command"] = [
        *command,
        f"{FLAG}={config_dir.rstrip('/')}/{CONFIG_FILE}",
        f"{FLAG}-automatic-reload=true",
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "keyward-encryption-config", "mountPath": config_dir, "readOnly": True},
        {"name": "keyward-kms-socket", "mountPath": socket_dir},
    ]
    volumes = [
        {"name": "keyward-encryption-config", "hostPath": {"path": config_dir, "type": "Directory"}},
        {"name": "keyward-kms-socket", "hostPath": {"path": socket_dir, "type": "Directory"}},
    ]
    names = {m["name"] for m in mounts}
    container["volumeMounts"] = [
        m for m in container.get("volumeMounts", []) if m.get("name") not in names
    ] + mounts
    spec["volumes"] = [v for v in spec.get("volumes", []) if v.get("name") not in names] + volumes
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubeadm_manifest.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", default=CONFIG_DIR, help=f"default {CONFIG_DIR}")
    parser.add_argument("--socket-dir", default=SOCKET_DIR, help=f"default {SOCKET_DIR}")
    args = parser.parse_args(argv)
    try:
        manifest = yaml.safe_load(sys.stdin)
        if not isinstance(manifest, dict):
            raise ValueError("standard input is not a YAML object")
        changed = add_encryption(manifest, config_dir=args.config_dir, socket_dir=args.socket_dir)
    except (ValueError, yaml.YAMLError) as exc:
        print(f"kubeadm_manifest: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump(changed, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
