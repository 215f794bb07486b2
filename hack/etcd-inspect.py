"""Show how each Secret is stored in the local control plane's etcd: provider and key_id, or plaintext.

Reads etcd directly with the KEYWARD_ETCD_* settings that `make -s env` exports; never decrypts.

    eval "$(make -s env)"; .venv/bin/python hack/etcd-inspect.py [PREFIX]   (default /registry/secrets/)
"""

from __future__ import annotations

import sys

from keyward import atrest
from keyward.etcd import EtcdClient, EtcdError


def main(argv: list[str]) -> int:
    prefix = argv[0] if argv else "/registry/secrets/"
    rows = [("KEY", "STORED AS", "PROVIDER", "KEY_ID")]
    try:
        for kv in EtcdClient.from_env().scan(prefix.encode()):
            found = atrest.inspect(kv.value)
            key = kv.key.decode(errors="replace")
            rows.append((key, found.protection.value, found.provider or "-", found.key_id or "-"))
    except EtcdError as exc:
        print(f'etcd-inspect: {exc} (for the local cluster: eval "$(make -s env)")', file=sys.stderr)
        return 2
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
