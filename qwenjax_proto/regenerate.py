"""Regenerate the committed stubs from proto/ with grpcio-tools (a dev dependency).

    python -m qwenjax_proto.regenerate

protoc names generated modules after the .proto path (``qwenjax/v1/…``), which would
shadow the ``qwenjax`` package; the stubs live in ``qwenjax_proto.v1`` instead, so the
one cross-module import protoc writes is pointed there.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[1] / "proto"
PROTO_FILE = "qwenjax/v1/inference.proto"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent / "v1"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the stubs of PROTO_FILE into ``out_dir`` (flat) and return their paths."""
    from grpc_tools import protoc

    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory() as raw:
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={raw}",
                            f"--pyi_out={raw}", f"--grpc_python_out={raw}", PROTO_FILE])
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE} (exit {code})")
        written = []
        for name in GENERATED:
            text = (pathlib.Path(raw) / "qwenjax" / "v1" / name).read_text()
            text = text.replace("from qwenjax.v1 import inference_pb2",
                                "from qwenjax_proto.v1 import inference_pb2")
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR):
        print(path)
