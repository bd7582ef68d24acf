"""Soak: every endpoint kind of both wires at once against one `rnnserve serve` on the demo
repository, for minutes, every answer checked; server RSS and latency reported over time.

Kinds (each with `--callers` concurrent callers, one request at a time): REST encode (surnames
texts; elnino with pooling "none", equal lengths), REST generate greedy / beam 4 / SSE stream
(dates), REST sessions and state-token streams (elnino, chunk by chunk), V2 REST infer
(surnames), gRPC Encode / Generate / GenerateStream, V2 gRPC ModelInfer (dates), V2 gRPC
ModelStreamInfer (surnames, 8 requests per stream), gRPC StreamSession (elnino). Expected answers
come from the checkpoints loaded here (`Seq2SeqModel.generate`, `EncoderModel`); a session's last
chunk must equal the whole sequence encoded at once.

    .venv/bin/python -m bench.soak [--duration 180] [--interval 30] [--callers 2] [--threads N]

Every interval prints, per kind: requests, failures, p50 / p99 latency; the server's RSS and
the host's load average (a drift shared by every kind, trivial encodes included, is the host's).
The end prints each kind's p50 drift (last interval ÷ first) and the RSS growth; the exit
status is 1 if any answer was wrong or failed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import torch

from bench.server import ROOT, Server, start_server
from models import checkpoint
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.inference_protocol.tensors import V2_DTYPES, unpack_bytes

REPOSITORY = ROOT / "demo-repository"
DATES = [
    "25 December 2021",
    "8 de junio de 2004",
    "Montag, 2. Oktober 2023",
    "3/4/1999",
    "the fourth of July 1776",
    "1 janvier 2000",
]
NAMES = ["Virtanen", "Dubois", "Schmidt", "Rossi", "Nakamura", "Kowalski", "Smith", "Novak"]
ATOL = 1e-4


# -- expected answers, from the checkpoints ----------------------------------------------------


@dataclass
class Expected:
    greedy: dict[str, str]
    beam: dict[str, str]
    names: dict[str, tuple[np.ndarray, str]]  # encoding, label
    series: list[np.ndarray]  # elnino sequences [T, 1]
    series_last: list[np.ndarray]  # their "last" encodings
    steps: dict[int, np.ndarray]  # length → elnino pooling "none" of series[0][:length]


def expected() -> Expected:
    dates = checkpoint.load(REPOSITORY / "dates" / "1")
    surnames = checkpoint.load(REPOSITORY / "surnames" / "1")
    elnino = checkpoint.load(REPOSITORY / "elnino" / "1")
    assert dates.input_tokenizer and dates.output_tokenizer and surnames.input_tokenizer
    greedy: dict[str, str] = {}
    beam: dict[str, str] = {}
    with torch.inference_mode():
        for text in DATES:
            ids = torch.tensor([dates.input_tokenizer.encode(text)])
            lengths = torch.tensor([ids.shape[1]])
            for size, table in ((1, greedy), (4, beam)):
                tokens = dates.model.generate(ids, lengths, beam_size=size)[0]  # type: ignore[union-attr]
                table[text] = dates.output_tokenizer.decode(tokens)
        names: dict[str, tuple[np.ndarray, str]] = {}
        labels = surnames.config.head.labels if surnames.config.head else None
        assert labels is not None
        for name in NAMES:
            ids = torch.tensor([surnames.input_tokenizer.encode(name)])
            out = surnames.model(ids, torch.tensor([ids.shape[1]]))
            assert out.scores is not None
            names[name] = (out.encodings[0].numpy(), labels[int(out.scores[0].argmax())])
        rng = np.random.default_rng(0)
        series = [(20 + 5 * rng.standard_normal((24, 1))).astype(np.float32) for _ in range(4)]
        series_last = [
            elnino.model(torch.from_numpy(s)[None], torch.tensor([24])).encodings[0].numpy()
            for s in series
        ]
        steps = {
            n: elnino.model(torch.from_numpy(series[0][:n])[None], torch.tensor([n]), "none")
            .encodings[0]
            .numpy()
            for n in (6, 12)
        }
    return Expected(greedy, beam, names, series, series_last, steps)


# -- one request of each kind: raises AssertionError on a wrong answer --------------------------


@dataclass
class Clients:
    server: Server
    http: httpx.Client
    channel: grpc.Channel
    want: Expected
    rng: random.Random = field(default_factory=random.Random)

    @property
    def api(self) -> pb_grpc.RnnServeStub:
        return pb_grpc.RnnServeStub(self.channel)

    @property
    def v2(self) -> v2_grpc.GRPCInferenceServiceStub:
        return v2_grpc.GRPCInferenceServiceStub(self.channel)


def _ok(r: httpx.Response, status: int = 200) -> dict[str, object]:
    assert r.status_code == status, f"{r.status_code}: {r.text[:300]}"
    body: dict[str, object] = r.json()
    return body


def rest_encode(c: Clients) -> None:
    names = c.rng.sample(NAMES, c.rng.randint(1, 4))
    body = _ok(c.http.post("/v1/models/surnames/encode", json={"texts": names}))
    for name, got, label in zip(names, body["encodings"], body["labels"], strict=True):  # type: ignore[call-overload]
        np.testing.assert_allclose(got, c.want.names[name][0], atol=ATOL)
        assert label == c.want.names[name][1]


def rest_pooling_none(c: Clients) -> None:
    n = c.rng.choice((6, 12))
    seq = c.want.series[0][:n].tolist()
    body = _ok(
        c.http.post("/v1/models/elnino/encode", json={"inputs": [seq, seq], "pooling": "none"})
    )
    for got in body["encodings"]:  # type: ignore[attr-defined]
        np.testing.assert_allclose(got, c.want.steps[n], atol=ATOL)


def rest_generate(beam: int) -> Callable[[Clients], None]:
    def call(c: Clients) -> None:
        texts = c.rng.sample(DATES, c.rng.randint(1, 3))
        body = _ok(
            c.http.post("/v1/models/dates/generate", json={"texts": texts, "beam_size": beam})
        )
        table = c.want.greedy if beam == 1 else c.want.beam
        assert [o["text"] for o in body["outputs"]] == [table[t] for t in texts]  # type: ignore[attr-defined]

    return call


def rest_sse(c: Clients) -> None:
    text = c.rng.choice(DATES)
    streamed, result = "", None
    with c.http.stream(
        "POST", "/v1/models/dates/generate", json={"texts": [text], "stream": True}
    ) as r:
        assert r.status_code == 200
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
                assert event != "error", data
                if event == "token":
                    streamed += data.get("text", "")
                elif event == "result":
                    result = data["outputs"][0]["text"]
    assert streamed == result == c.want.greedy[text], (streamed, result)


def rest_session(c: Clients) -> None:
    k = c.rng.randrange(len(c.want.series))
    seq = c.want.series[k]
    sid = _ok(c.http.post("/v1/models/elnino/sessions", json={}), 201)["session_id"]
    try:
        for start in (0, 10, 17):
            end = {0: 10, 10: 17, 17: 24}[start]
            chunk = {"inputs": seq[start:end].tolist()}
            body = _ok(c.http.post(f"/v1/sessions/{sid}/chunks", json=chunk))
        np.testing.assert_allclose(body["encoding"], c.want.series_last[k], atol=ATOL)  # type: ignore[arg-type]
    finally:
        c.http.delete(f"/v1/sessions/{sid}")


def rest_token_stream(c: Clients) -> None:
    k = c.rng.randrange(len(c.want.series))
    seq = c.want.series[k]
    token = None
    for start, end in ((0, 8), (8, 16), (16, 24)):
        body: dict[str, object] = {"inputs": seq[start:end].tolist()}
        if token is not None:
            body["state_token"] = token
        answer = _ok(c.http.post("/v1/models/elnino/stream", json=body))
        token = answer["state_token"]
    np.testing.assert_allclose(answer["encoding"], c.want.series_last[k], atol=ATOL)  # type: ignore[arg-type]


def v2_rest_infer(c: Clients) -> None:
    names = c.rng.sample(NAMES, c.rng.randint(1, 4))
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(names)], "data": names}]}
    outputs = {
        o["name"]: o for o in _ok(c.http.post("/v2/models/surnames/infer", json=body))["outputs"]
    }  # type: ignore[attr-defined]
    encodings = np.array(outputs["ENCODING"]["data"], np.float32).reshape(
        outputs["ENCODING"]["shape"]
    )
    for i, name in enumerate(names):
        np.testing.assert_allclose(encodings[i], c.want.names[name][0], atol=ATOL)
        assert outputs["LABELS"]["data"][i] == c.want.names[name][1]


def grpc_encode(c: Clients) -> None:
    names = c.rng.sample(NAMES, c.rng.randint(1, 4))
    answer = c.api.Encode(
        pb.EncodeRequest(model="surnames", texts=pb.TextInputs(texts=names)), timeout=60
    )
    for name, got, label in zip(names, answer.encodings, answer.labels, strict=True):
        np.testing.assert_allclose(got.values, c.want.names[name][0], atol=ATOL)
        assert label == c.want.names[name][1]


def grpc_generate(c: Clients) -> None:
    texts = c.rng.sample(DATES, c.rng.randint(1, 3))
    request = pb.GenerateRequest(model="dates", texts=pb.TextInputs(texts=texts), beam_size=4)
    answer = c.api.Generate(request, timeout=60)
    assert [o.text for o in answer.outputs] == [c.want.beam[t] for t in texts]


def grpc_generate_stream(c: Clients) -> None:
    text = c.rng.choice(DATES)
    streamed, result = "", None
    request = pb.GenerateRequest(model="dates", texts=pb.TextInputs(texts=[text]))
    for event in c.api.GenerateStream(request, timeout=60):
        if event.HasField("token"):
            streamed += event.token.text
        else:
            result = event.result.outputs[0].text
    assert streamed == result == c.want.greedy[text], (streamed, result)


def v2_outputs(response: v2.ModelInferResponse) -> dict[str, np.ndarray | list[bytes]]:
    """A V2 gRPC answer's outputs by name (rnnserve answers raw contents)."""
    outputs: dict[str, np.ndarray | list[bytes]] = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            outputs[output.name] = unpack_bytes(raw, output.name)
        else:
            dtype = V2_DTYPES[output.datatype]
            outputs[output.name] = np.frombuffer(raw, dtype).reshape(tuple(output.shape))
    return outputs


def v2_grpc_infer(c: Clients) -> None:
    texts = c.rng.sample(DATES, c.rng.randint(1, 3))
    request = v2.ModelInferRequest(model_name="dates")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    outputs = v2_outputs(c.v2.ModelInfer(request, timeout=60))
    got = [bytes(b).decode() for b in outputs["OUTPUT_TEXT"]]
    assert got == [c.want.greedy[t] for t in texts]


def v2_grpc_stream(c: Clients) -> None:
    names = [c.rng.choice(NAMES) for _ in range(8)]

    def requests() -> Iterator[v2.ModelInferRequest]:
        for i, name in enumerate(names):
            request = v2.ModelInferRequest(model_name="surnames", id=str(i))
            tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(name.encode())
            yield request

    seen = 0
    for answer in c.v2.ModelStreamInfer(requests(), timeout=60):
        assert not answer.error_message, answer.error_message
        name = names[int(answer.infer_response.id)]
        outputs = v2_outputs(answer.infer_response)
        encoding = outputs["ENCODING"]
        assert isinstance(encoding, np.ndarray)
        np.testing.assert_allclose(encoding[0], c.want.names[name][0], atol=ATOL)
        seen += 1
    assert seen == len(names)


def grpc_session(c: Clients) -> None:
    k = c.rng.randrange(len(c.want.series))
    seq = c.want.series[k]

    def requests() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(open=pb.SessionOpen(model="elnino"))
        for start, end in ((0, 5), (5, 20), (20, 24)):
            part = seq[start:end]
            values = pb.FloatArray(shape=list(part.shape), values=part.ravel().tolist())
            yield pb.SessionRequest(chunk=pb.SessionChunk(inputs=values))

    *_, last = c.api.StreamSession(requests(), timeout=60)
    np.testing.assert_allclose(last.chunk.encoding.values, c.want.series_last[k], atol=ATOL)


KINDS: dict[str, Callable[[Clients], None]] = {
    "rest encode": rest_encode,
    "rest encode none": rest_pooling_none,
    "rest generate": rest_generate(1),
    "rest generate beam": rest_generate(4),
    "rest generate sse": rest_sse,
    "rest session": rest_session,
    "rest token stream": rest_token_stream,
    "v2 rest infer": v2_rest_infer,
    "grpc encode": grpc_encode,
    "grpc generate beam": grpc_generate,
    "grpc generate stream": grpc_generate_stream,
    "v2 grpc infer": v2_grpc_infer,
    "v2 grpc stream infer": v2_grpc_stream,
    "grpc session": grpc_session,
}


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Record:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def take(self) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
        with self.lock:
            out = (dict(self.latencies), dict(self.failures))
            self.latencies, self.failures = defaultdict(list), defaultdict(list)
        return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def caller(kind: str, clients: Clients, record: Record, stop: threading.Event) -> None:
    call = KINDS[kind]
    while not stop.is_set():
        start = time.perf_counter()
        try:
            call(clients)
            failure = None
        except Exception as exc:  # a wrong answer or a failed call: both are failures here
            failure = f"{type(exc).__name__}: {str(exc)[:200]}"
        seconds = time.perf_counter() - start
        with record.lock:
            record.latencies[kind].append(seconds)
            if failure is not None:
                record.failures[kind].append(failure)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--callers", type=int, default=2, help="concurrent callers per kind")
    parser.add_argument("--threads", type=int, default=None, help="--cpu-threads of the server")
    args = parser.parse_args()
    want = expected()
    flags = [] if args.threads is None else ["--cpu-threads", str(args.threads)]
    server = start_server(REPOSITORY, *flags)
    record = Record()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    opened: list[tuple[httpx.Client, grpc.Channel]] = []
    for kind in KINDS:
        for k in range(args.callers):
            http = httpx.Client(base_url=server.url, timeout=60)
            channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
            opened.append((http, channel))
            clients = Clients(server, http, channel, want, random.Random(f"{kind}{k}"))
            threads.append(
                threading.Thread(target=caller, args=(kind, clients, record, stop), daemon=True)
            )
    pid = server.process.pid
    rss = [rss_mb(pid)]
    print(f"{len(threads)} callers over {len(KINDS)} kinds; server RSS at start {rss[0]:.0f} MB")
    p50s: dict[str, list[float]] = defaultdict(list)
    total_failures = 0
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        while time.monotonic() - started < args.duration:
            time.sleep(min(args.interval, args.duration - (time.monotonic() - started)))
            latencies, failures = record.take()
            rss.append(rss_mb(pid))
            elapsed = time.monotonic() - started
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"\n-- {elapsed:5.0f} s, server RSS {rss[-1]:.0f} MB, host load {load}")
            for kind in KINDS:
                values = latencies.get(kind, [])
                failed = failures.get(kind, [])
                total_failures += len(failed)
                if values:
                    p50s[kind].append(statistics.median(values))
                    print(
                        f"   {kind:22s} {len(values):6d} req  {len(failed):4d} failed  "
                        f"p50 {statistics.median(values) * 1000:7.1f} ms  "
                        f"p99 {percentile(values, 0.99) * 1000:7.1f} ms"
                    )
                for failure in failed[:3]:
                    print(f"      ! {failure}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(70)
        for http, channel in opened:
            http.close()
            channel.close()
        code = server.stop()
    print(
        f"\nRSS: start {rss[0]:.0f} MB, after the first interval {rss[1]:.0f} MB, "
        f"end {rss[-1]:.0f} MB (growth after the first interval {rss[-1] - rss[1]:+.0f} MB)"
    )
    print("p50 drift (last interval ÷ first):")
    for kind, values in p50s.items():
        if len(values) >= 2:
            print(f"   {kind:22s} {values[-1] / values[0]:5.2f}")
    print(f"failures: {total_failures}; server exit status {code}")
    return 1 if total_failures or code != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
