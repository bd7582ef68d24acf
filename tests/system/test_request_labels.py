"""What `/metrics` and the model listings show, read as a dashboard author reads them.

Every successful request that resolved a model version is labelled with that version, on every
endpoint and both wires (a dashboard filtering `version="1"` must see streams and sessions too);
no `_created` series; figures in JSON listings rounded as a person would read them.
"""

from __future__ import annotations

import re

import grpc
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.support import ServerProcess

MONTHS = [[22.7], [24.4], [25.5]]
# Endpoints that may name a model without resolving one of its versions (the model as a whole).
MODEL_WIDE = {"get_model", "model_ready"}


def _every_endpoint_once(server: ServerProcess) -> None:
    """One successful request on each model-addressed endpoint, over REST and gRPC."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        answers = [
            http.post("/v1/models/surnames/encode", json={"texts": ["Rossi"]}),
            http.post("/v1/models/dates/generate", json={"texts": ["1 May 2020"]}),
            http.post("/v1/models/dates/generate", json={"texts": ["1 May 2020"], "stream": True}),
            http.post("/v1/models/elnino/stream", json={"inputs": MONTHS}),
            http.get("/v1/models/elnino"),
            http.get("/v1/models/elnino/versions/1"),
            http.get("/v2/models/elnino"),
            http.get("/v2/models/elnino/ready"),
            http.get("/v2/models/elnino/versions/1/ready"),
        ]
        opened = http.post("/v1/models/elnino/sessions", json={})
        session = opened.json()["session_id"]
        answers += [
            opened,
            http.post(f"/v1/sessions/{session}/chunks", json={"inputs": MONTHS}),
            http.get(f"/v1/sessions/{session}"),
            http.delete(f"/v1/sessions/{session}"),
        ]
        assert all(a.status_code < 300 for a in answers), [a.text for a in answers]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        api = pb_grpc.RnnServeStub(channel)
        chunk = pb.SessionChunk(inputs=pb.FloatArray(shape=[3, 1], values=[m[0] for m in MONTHS]))
        api.StreamChunk(pb.StreamChunkRequest(model="elnino", chunk=chunk), timeout=30)
        opening = pb.SessionRequest(open=pb.SessionOpen(model="elnino"))
        list(api.StreamSession(iter([opening, pb.SessionRequest(chunk=chunk)]), timeout=30))
        texts = pb.TextInputs(texts=["Rossi"])
        api.Encode(pb.EncodeRequest(model="surnames", texts=texts), timeout=30)
        dates = pb.TextInputs(texts=["1 May 2020"])
        list(api.GenerateStream(pb.GenerateRequest(model="dates", texts=dates), timeout=30))
        oip = v2_grpc.GRPCInferenceServiceStub(channel)
        oip.ModelMetadata(v2.ModelMetadataRequest(name="elnino"), timeout=30)
        oip.ModelReady(v2.ModelReadyRequest(name="elnino", version="1"), timeout=30)
        request = v2.ModelInferRequest(model_name="elnino")
        tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 3, 1])
        tensor.contents.fp32_contents.extend(np.array(MONTHS, np.float32).ravel().tolist())
        oip.ModelInfer(request, timeout=30)


def test_successes_are_labelled_with_the_version_they_resolved(
    demo_server: ServerProcess,
) -> None:
    _every_endpoint_once(demo_server)
    text = httpx.get(f"{demo_server.url}/metrics", timeout=10).text
    seen = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "rnnserve_requests_total" or sample.labels["outcome"] != "success":
                continue
            labels = sample.labels
            seen.add((labels["protocol"], labels["endpoint"], labels["version"]))
            if labels["model"] and labels["endpoint"] not in MODEL_WIDE:
                assert labels["version"] == "1", labels
    for wire, endpoint in [
        ("rest", "stream"),
        ("rest", "session_open"),
        ("rest", "session_chunk"),
        ("rest", "encode"),
        ("rest", "generate_stream"),
        ("v2-rest", "model_metadata"),
        ("rest", "get_model"),  # a version in the path
        ("v2-rest", "model_ready"),
        ("grpc", "stream"),
        ("grpc", "session_open"),
        ("v2-grpc", "model_metadata"),
        ("v2-grpc", "model_ready"),
        ("v2-grpc", "infer"),
    ]:
        assert (wire, endpoint, "1") in seen, (wire, endpoint)


def test_no_created_series(demo_server: ServerProcess) -> None:
    text = httpx.get(f"{demo_server.url}/metrics", timeout=10).text
    assert "rnnserve_requests_total" in text
    assert "_created" not in text


def test_listings_round_their_figures(demo_server: ServerProcess) -> None:
    listing = httpx.get(f"{demo_server.url}/v1/models", timeout=10)
    for model in listing.json()["models"]:
        for version in model["versions"]:
            seconds = version["load_seconds"]
            assert seconds is not None and seconds > 0
            assert round(seconds, 3) == seconds, seconds
    # The text as sent: no figure printed with 17 digits.
    printed = re.findall(r'"load_seconds":([-0-9.eE+]+)', listing.text)
    assert printed and all(len(figure) <= 8 for figure in printed), printed
