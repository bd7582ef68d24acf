"""The KServe Python SDK (`kserve.InferenceRESTClient`, `InferenceGRPCClient`) works unchanged.

KServe users call model servers through it: its health calls read `{"live": true}` /
`{"ready": true}` from the body (not only the status, as Triton's clients do), and it infers over
both V2 wires. It runs in its own process against `rnnserve serve` on the demo repository: its
`inference.*` protos share symbol names with the server's, which one protobuf descriptor pool
cannot hold together.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support import ServerProcess

pytestmark = pytest.mark.timeout(120)

_KSERVE_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys

    import numpy as np
    from kserve import (
        InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig,
    )

    http_url, grpc_url = sys.argv[1], sys.argv[2]

    def request():
        text = InferInput("TEXT", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"Virtanen", b"Dubois"], dtype=object))
        return InferRequest(model_name="surnames", infer_inputs=[text])

    def labels(response):
        output = next(o for o in response.outputs if o.name == "LABELS")
        return [v.decode() if isinstance(v, bytes) else v for v in output.as_numpy().ravel()]

    async def main():
        answers = {}
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        answers["rest"] = {
            "live": await rest.is_server_live(http_url),
            "ready": await rest.is_server_ready(http_url),
            "model_ready": await rest.is_model_ready(http_url, "surnames"),
            "labels": labels(await rest.infer(http_url, request(), model_name="surnames")),
        }
        await rest.close()
        grpc = InferenceGRPCClient(grpc_url, timeout=30)
        answers["grpc"] = {
            "live": await grpc.is_server_live(),
            "ready": await grpc.is_server_ready(),
            "model_ready": await grpc.is_model_ready("surnames"),
            "labels": labels(await grpc.infer(request())),
        }
        await grpc.close()
        print(json.dumps(answers))

    asyncio.run(main())
    """
)


def test_kserve_sdk_health_and_inference(demo_server: ServerProcess) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _KSERVE_CLIENT,
            demo_server.url,
            f"127.0.0.1:{demo_server.grpc_port}",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    for wire in ("rest", "grpc"):
        assert answers[wire] == {
            "live": True,
            "ready": True,
            "model_ready": True,
            "labels": ["Finnish", "French"],
        }, wire
