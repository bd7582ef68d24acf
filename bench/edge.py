"""Hostile and careless clients against a real `rnnserve serve` (run as `python -m bench.edge`).

Starts the server on the demo repository (management on, with a token) as a subprocess and
sends each request below while another process polls `/healthz` every 50 ms. Each case runs on a
fresh server; the table says what the client got, how long it took, the slowest `/healthz`
answer meanwhile (the event loop's longest stall, give or take 50 ms; polled from another
process), the growth of the server's peak RSS (VmHWM, reset before the case through
/proc/PID/clear_refs) and of its RSS a second after the case.

    .venv/bin/python -m bench.edge [--cases rest-rows grpc-int64 ...] [--scale 1.0]

`--scale` shrinks every request (0.1 = a tenth) for a quick check that the script runs; at full
size the bodies and messages are as large as the 64 MiB body and message limits let through.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import grpc
import httpx
from google.protobuf.message import Message

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-edge-token"
MIB = 1024 * 1024
# The server's defaults (service/core/settings.py): the largest body / message a client may send.
BODY_LIMIT = 64 * MIB
MESSAGE_LIMIT = 64 * MIB
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


@dataclass
class Server:
    process: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def status(self, key: str) -> int:
        """A /proc/PID/status field in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
        return 0

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux ≥ 4.0); False when not allowed."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


def start_server(extra: list[str]) -> Server:
    """`rnnserve serve` on demo-repository, ports read from its JSON startup line."""
    env = {**os.environ, "RNNSERVE_MANAGEMENT_TOKEN": TOKEN}
    command = [
        sys.executable, "-m", "service.process.cli", "serve", "--repository", "demo-repository",
        "--http-port", "0", "--grpc-port", "0", "--log-format", "json",
        "--management-enabled", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    ports: list[int] = []
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if '"server.ready"' in line:
                summary = json.loads(line)
                ports.extend([summary["http_port"], summary["grpc_port"]])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120) or not ports:
        process.kill()
        raise SystemExit("the server did not become ready:\n" + "".join(lines[-20:]))
    return Server(process, ports[0], ports[1], lines)


def _poll(url: str, stop: Event, results: Connection) -> None:
    latencies: list[float] = []
    while not stop.is_set():
        start = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=60)
        latencies.append(time.perf_counter() - start)
        stop.wait(0.05)
    results.send(latencies)


@contextlib.contextmanager
def healthz_poller(server: Server) -> Iterator[list[float]]:
    """Poll /healthz every 50 ms on a fresh connection each time, from another process (so
    that the client's own work on big requests cannot delay it); yields the latencies (s),
    filled in when the block ends."""
    latencies: list[float] = []
    stop = multiprocessing.Event()
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_poll, args=(f"{server.url}/healthz", stop, send))
    process.start()
    time.sleep(0.2)
    try:
        yield latencies
    finally:
        stop.set()
        latencies.extend(receive.recv())
        process.join()


# --- the requests ---------------------------------------------------------------------------
#
# Each case builds its request first (outside the measurement) and returns what sends it.

Send = Callable[[Server], str]


def _post(path: str, body: bytes) -> Send:
    def send(server: Server) -> str:
        headers = {"content-type": "application/json"}
        response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=600)
        detail = response.text[:110].replace("\n", " ")
        return f"{response.status_code} {detail}"

    return send


def _unary(method: str, message: bytes, answer: type[Message]) -> Send:
    """A unary call of a serialized request (no client-side work while it is measured)."""

    def send(server: Server) -> str:
        with grpc.insecure_channel(server.target, options=GRPC_OPTIONS) as channel:
            call = channel.unary_unary(method, response_deserializer=answer.FromString)
            try:
                call(message, timeout=600)
            except grpc.RpcError as exc:
                return f"{exc.code().name} {(exc.details() or '')[:110]}"
        return f"OK {answer.DESCRIPTOR.name}"

    return send


INFER = "/inference.GRPCInferenceService/ModelInfer"
ENCODE = "/rnnserve.v1.RnnServe/Encode"


def fill(limit: int, scale: float, head: str, item: bytes, tail: bytes) -> bytes:
    """`head + item * n + tail` (items joined by ','), n as large as fits `limit × scale`;
    `head` may hold `{n}`."""
    n = max(1, int((limit * scale - len(head) - len(tail) - 1024) // (len(item) + 1)))
    return head.format(n=n).encode() + b",".join([item] * n) + tail


def rest_rows(scale: float) -> Send:
    """rnnserve API: one sequence of one-step rows, the largest body the limit takes."""
    return _post(
        "/v1/models/elnino/encode", fill(BODY_LIMIT, scale, '{{"inputs":[[', b"[0]", b"]]}")
    )


def v2_json_numbers(scale: float) -> Send:
    """V2 JSON: INPUT data of one-digit numbers (flattened), as large as the limit takes."""
    head = '{{"inputs":[{{"name":"INPUT","datatype":"FP32","shape":[1,{n},1],"data":['
    return _post("/v2/models/elnino/infer", fill(BODY_LIMIT, scale, head, b"0", b"]}]}"))


def v2_json_strings(scale: float) -> Send:
    """V2 JSON: TEXT data of one-letter strings, as large as the limit takes."""
    head = '{{"inputs":[{{"name":"TEXT","datatype":"BYTES","shape":[{n}],"data":['
    return _post("/v2/models/surnames/infer", fill(BODY_LIMIT, scale, head, b'"a"', b"]}]}"))


def _v2_request(kind: str, scale: float) -> bytes:
    request = v2.ModelInferRequest(model_name="surnames")
    if kind == "int64":
        # 1 byte per element on the wire (a zero varint, packed): the largest count that fits.
        count = int((MESSAGE_LIMIT * scale - 1024) // 1.05)
        tensor = request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, count])
        tensor.contents.int64_contents.extend([0] * count)
    else:
        count = int((MESSAGE_LIMIT * scale - 1024) // 2.1)
        tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[count])
        tensor.contents.bytes_contents.extend([b""] * count)
    return request.SerializeToString()


def grpc_int64(scale: float) -> Send:
    """V2 ModelInfer with int64_contents as large as the message limit takes."""
    return _unary(INFER, _v2_request("int64", scale), v2.ModelInferResponse)


def grpc_bytes(scale: float) -> Send:
    """V2 ModelInfer with bytes_contents (empty strings) as large as the message limit takes."""
    return _unary(INFER, _v2_request("bytes", scale), v2.ModelInferResponse)


def grpc_v1_tokens(scale: float) -> Send:
    """rnnserve Encode with one token sequence as long as the message limit takes."""
    count = int((MESSAGE_LIMIT * scale - 1024) // 1.05)
    request = pb.EncodeRequest(model="surnames")
    request.tokens.sequences.add(ids=[0] * count)
    return _unary(ENCODE, request.SerializeToString(), pb.EncodeResponse)


def grpc_retained(scale: float) -> Send:
    """Three refused int64 calls in a row (RSS one second after them shows what is kept)."""
    one = grpc_int64(scale)
    return lambda server: " / ".join(sorted({one(server) for _ in range(3)}))


def _texts(count: int, length: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choices(string.ascii_letters, k=length)) for _ in range(count)]


def rest_pooling_none(scale: float) -> Send:
    """64 texts of 2,000 characters with pooling "none" (per-step encodings, 256 floats each)."""
    texts = _texts(64, max(1, int(2000 * scale)))
    return _post(
        "/v1/models/surnames/encode", json.dumps({"texts": texts, "pooling": "none"}).encode()
    )


def grpc_pooling_none(scale: float) -> Send:
    """The same request over rnnserve.v1 Encode."""
    request = pb.EncodeRequest(model="surnames", pooling="none")
    request.texts.texts.extend(_texts(64, max(1, int(2000 * scale))))
    return _unary(ENCODE, request.SerializeToString(), pb.EncodeResponse)


def _stream_infers(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rnnserve_requests_total{") and 'endpoint="stream_infer"' in line
    )


def stream_unread(scale: float) -> Send:
    """ModelStreamInfer: 64 requests of 16 texts × 500 characters, pooling "none" (8 MB answers),
    answers never read; once the server stops running more of them (or after 60 s), how many
    it ran and its RSS."""
    texts = [t.encode() for t in _texts(16, max(1, int(500 * scale)))]
    request = v2.ModelInferRequest(model_name="surnames")
    request.parameters["pooling"].string_param = "none"
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(texts)

    def send(server: Server) -> str:
        def requests() -> Iterator[v2.ModelInferRequest]:
            yield from [request] * 64
            time.sleep(120)

        with grpc.insecure_channel(server.target, options=GRPC_OPTIONS) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(requests(), timeout=180)
            ran, still = -1.0, 0
            for _ in range(60):
                time.sleep(1.0)
                now = _stream_infers(server)
                still = still + 1 if now == ran else 0
                ran = now
                if still == 3:
                    break
            rss = server.status("VmRSS")
            call.cancel()
        return f"ran {ran:.0f} of 64 with no answer read; RSS then {rss} MB"

    return send


def made_up_versions(scale: float) -> Send:
    """300 generate requests to made-up versions of `dates`; /metrics bytes before and after."""

    def send(server: Server) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            before = len(client.get("/metrics").content)
            codes = set()
            for i in range(max(1, int(300 * scale))):
                path = f"/v1/models/dates/versions/{100_000 + i}/generate"
                codes.add(client.post(path, json={"texts": ["1 May 2020"]}).status_code)
            after = len(client.get("/metrics").content)
        return f"statuses {sorted(codes)}; /metrics grew {after - before} bytes"

    return send


def half_sent_request(scale: float) -> Send:
    """A connection that sends half a request line and headers, then nothing (60 s at most)."""

    def send(server: Server) -> str:
        with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
            sock.sendall(b"POST /v1/models/elnino/encode HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(60)
            start = time.perf_counter()
            try:
                data = sock.recv(1024)
            except TimeoutError:
                return "still open after 60 s"
        first = data.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed, no answer)"
        return f"{first} after {time.perf_counter() - start:.1f} s"

    return send


def trickled_body(scale: float) -> Send:
    """Headers complete, then one body byte every 2 s of a 1,000-byte body (120 s at most)."""

    def send(server: Server) -> str:
        with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
            sock.sendall(
                b"POST /v1/models/elnino/encode HTTP/1.1\r\nHost: x\r\n"
                b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
            )
            sock.settimeout(2)
            start = time.perf_counter()
            while time.perf_counter() - start < 120:
                try:
                    sock.sendall(b" ")
                    data = sock.recv(1024)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                first = data.split(b"\r\n", 1)[0].decode(errors="replace")
                return f"{first or '(closed, no answer)'} after {time.perf_counter() - start:.1f} s"
        return "still open after 120 s"

    return send


CASES: dict[str, Callable[[float], Send]] = {
    "rest-rows": rest_rows,
    "v2-json-numbers": v2_json_numbers,
    "v2-json-strings": v2_json_strings,
    "grpc-int64": grpc_int64,
    "grpc-bytes": grpc_bytes,
    "grpc-v1-tokens": grpc_v1_tokens,
    "grpc-retained": grpc_retained,
    "rest-pooling-none": rest_pooling_none,
    "grpc-pooling-none": grpc_pooling_none,
    "stream-unread": stream_unread,
    "made-up-versions": made_up_versions,
    "half-sent-request": half_sent_request,
    "trickled-body": trickled_body,
}


def main() -> int:
    """Run each case on a fresh server (nothing one case keeps can weigh on the next) and print
    a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="request size factor")
    parser.add_argument("--server-flag", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()
    if not __package__:
        raise SystemExit("run from the repository root as a module: python -m bench.edge")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; ", end="")
    print(f"scale {args.scale}\n")
    print(
        "| case | answer | seconds | slowest /healthz s | RSS at start MB "
        "| peak RSS growth MB | RSS +1 s MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.cases:
        send = CASES[name](args.scale)
        server = start_server(args.server_flag)
        try:
            time.sleep(1.0)
            rss_before = server.status("VmRSS")
            peak_reset = server.reset_peak()
            with healthz_poller(server) as latencies:
                start = time.perf_counter()
                answer = send(server)
                seconds = time.perf_counter() - start
            peak = server.status("VmHWM") - rss_before if peak_reset else float("nan")
            time.sleep(1.0)
            after = server.status("VmRSS") - rss_before
        finally:
            server.process.terminate()
            try:
                server.process.wait(60)
            except subprocess.TimeoutExpired:
                server.process.kill()
        slowest = max(latencies, default=float("nan"))
        answer = answer.replace("|", "/")
        print(
            f"| {name} | {answer} | {seconds:.1f} | {slowest:.2f} | {rss_before} | {peak:.0f} "
            f"| {after:+d} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
