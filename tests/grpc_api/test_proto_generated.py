"""The committed generated code in client/rnnserve_client/proto matches proto/ (else: run
`make proto`); the server imports these same stubs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

COMMITTED = ROOT / "client" / "rnnserve_client" / "proto"


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "proto"
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
    from rnnserve_client.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
    from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

    assert rnnserve_pb2.DESCRIPTOR.package == "rnnserve.v1"
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert hasattr(rnnserve_pb2_grpc, "RnnServeServicer")
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")


def test_the_server_uses_the_client_packages_stubs() -> None:
    from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2
    from service.grpc_api import server as grpc_api

    assert grpc_api.pb is rnnserve_pb2
    # One copy of the generated code: none anywhere else in the tree.
    folders = ("service", "models", "client", "bench", "scripts", "tests")
    generated = [
        path
        for folder in folders
        for path in (ROOT / folder).rglob("*_pb2*.py*")
        # pip's build folders (ignored by git) hold copies of the package being installed.
        if "build" not in path.relative_to(ROOT).parts
    ]
    assert generated
    assert all(COMMITTED in p.parents for p in generated), generated
