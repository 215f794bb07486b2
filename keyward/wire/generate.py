"""Regenerates the Python stubs in this package from the .proto files in proto/.

The stubs are committed so that an installed Keyward needs no code generator; tests/unit/test_wire_stubs.py
regenerates them into a temporary folder and fails when the committed files differ, so they never drift
from proto/ or from the pinned grpcio-tools. Run `make protos` after editing a .proto file.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTOS = ("kmsv2/api.proto", "kmsv2/envelope.proto")
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc (from grpcio-tools) and returns the files written into out_dir."""
    from grpc_tools import protoc

    with_grpc = "kmsv2/api.proto"
    tmp = out_dir / "_gen"
    tmp.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            str(PROTO_ROOT / proto),
        ]
        if proto == with_grpc:
            args.insert(3, f"--grpc_python_out={tmp}")
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
    written = []
    for src in sorted((tmp / "kmsv2").iterdir()):
        text = src.read_text()
        # protoc emits `from kmsv2 import api_pb2`; the stubs live in keyward.wire instead.
        text = re.sub(r"^from kmsv2 import ", "from keyward.wire import ", text, flags=re.M)
        dst = out_dir / src.name
        dst.write_text(text)
        written.append(dst)
    for src in (tmp / "kmsv2").iterdir():
        src.unlink()
    (tmp / "kmsv2").rmdir()
    tmp.rmdir()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=PACKAGE_DIR)
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path}", file=sys.stderr)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
