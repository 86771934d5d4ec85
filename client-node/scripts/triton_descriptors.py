"""Write Triton's gRPC service descriptors, taken from the installed ``tritonclient`` package,
as one FileDescriptorSet for @grpc/proto-loader (``npm run build`` calls this).

tritonclient ships no .proto files, only the protoc-generated ``tritonclient.grpc.service_pb2``
and ``model_config_pb2``; each embeds its compiled .proto as a serialized FileDescriptorProto,
so the set written here is what ``protoc --descriptor_set_out`` would write for
grpc_service.proto and its imports. Usage: ``python triton_descriptors.py OUT_DIR``; writes
OUT_DIR/triton.desc and OUT_DIR/triton.json (where it came from).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def descriptor_set() -> tuple[bytes, dict]:
    """The FileDescriptorSet (dependencies first) of Triton's GRPCInferenceService, and its
    provenance."""
    from importlib.metadata import version

    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    files, seen = [], set()

    def add(fd) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        files.append(fd)

    add(service_pb2.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for fd in files:
        out.file.add().ParseFromString(fd.serialized_pb)
    info = {"tritonclient": version("tritonclient"), "module": service_pb2.__file__,
            "files": [fd.name for fd in files],
            "services": sorted(service_pb2.DESCRIPTOR.services_by_name)}
    return out.SerializeToString(), info


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: triton_descriptors.py OUT_DIR", file=sys.stderr)
        return 2
    try:
        data, info = descriptor_set()
    except ImportError as e:
        print(f"triton_descriptors.py: cannot import tritonclient's gRPC modules with "
              f"{sys.executable} ({e}); install them (pip install 'tritonclient[grpc]', or "
              "'imageragturbo[client]') or set PYTHON to an interpreter that has them",
              file=sys.stderr)
        return 1
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton.desc").write_bytes(data)
    (out / "triton.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"triton.desc: {', '.join(info['files'])} from tritonclient {info['tritonclient']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
