"""The committed generated code in service/_proto matches proto/ (else: run `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "service" / "_proto"


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    fresh, committed = _tree(out), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "file list differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files (run `make proto`): {stale}"


def test_generated_packages_import() -> None:
    from service._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
    from service._proto.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

    assert rnnserve_pb2.DESCRIPTOR.package == "rnnserve.v1"
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert hasattr(rnnserve_pb2_grpc, "RnnServeServicer")
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")
