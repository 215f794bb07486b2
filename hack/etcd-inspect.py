"""Show how each Secret is stored in the local control plane's etcd: provider and key_id, or plaintext.

Reads etcd directly with the KEYWARD_ETCD_* settings that `make -s env` exports; never decrypts.

    eval "$(make -s env)"; .venv/bin/python hack/etcd-inspect.py [PREFIX]   (default /registry/secrets/)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import localcluster
from keyward import atrest


def main(argv: list[str]) -> int:
    prefix = argv[0] if argv else "/registry/secrets/"
    try:
        etcd = localcluster.EtcdClient.from_env()
    except (KeyError, ValueError) as exc:
        print(f'etcd-inspect: {exc}; run `eval "$(make -s env)"` first', file=sys.stderr)
        return 2
    rows = [("KEY", "STORED AS", "PROVIDER", "KEY_ID")]
    for key, value in sorted(etcd.items(prefix).items()):
        found = atrest.inspect(value)
        rows.append((key, found.protection.value, found.provider or "-", found.key_id or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
