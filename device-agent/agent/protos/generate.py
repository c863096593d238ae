"""Regenerate the checked-in message modules from the .proto files beside this script.

    python device-agent/agent/protos/generate.py [OUT]

The generated ``*_pb2.py`` files are checked in so that a device needs only ``grpcio`` and
``protobuf`` (``edgeship[grpc]``), never ``grpcio-tools``; ``make protos`` runs this, and
tests/test_agent_protocols_grpc.py checks that the checked-in files are what it generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = ("edgeship_oip.proto", "edgeship_tfserving.proto")


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        code = protoc.main(
            ["protoc", f"-I{here}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", str(here / proto)]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {code})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
