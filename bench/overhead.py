"""The host path: what rnnserve costs per request beyond reading it (run as a module:
`python -m bench.overhead`; bench/ holds files named like packages).

A model whose kernel costs almost nothing (LSTM input 32 → hidden 8, 1 layer) served by
`rnnserve serve`, against a bare one-process ceiling written for the purpose (`--bare`): uvicorn
(httptools, uvloop) with a raw ASGI app and a grpc.aio server on one loop, that read each request
and parse it as rnnserve must (`orjson.loads` and `np.array(float32)`; the V2 binary tensor by
`np.frombuffer`; the gRPC messages parsed into protobuf, their floats to numpy) and answer a fixed
small message. Five wires: rnnserve JSON, V2 JSON, V2 binary, rnnserve gRPC (Encode), V2 gRPC
(ModelInfer, raw contents); bodies of 16–128 steps of 32 floats (~17 KB of JSON). HTTP load by
wrk (bench/http.py's Lua script); gRPC load by h2load (`apt-get install nghttp2-client`: four
processes, one connection each, bodies of 30, 58, 86 and 114 steps; it reports mean latency, not
percentiles) with many calls in flight, and by bench/grpc.py's Python client at 1 client (p50)
or where h2load is missing. Every round measures each server in turn (who goes first
alternates), per wire and client count; ratios are medians of the rounds' served ÷ bare.

Besides req/s and p50, the servers' CPU time per request by thread (from /proc: the event loop
= the main thread, the device thread, the rest), and the load generators' CPU (cores busy).
`--check-generators` runs one and then two generators against the bare server (the most
demanding), and for gRPC the Python client against h2load: if two together get no more, one is
not the bottleneck. Where the bare server's loop is not saturated (it idles, waiting for the load
generator), the loop-CPU-per-request ratio is the fairer comparison.

`--profile DIR` samples each server under the highest client count with py-spy (`pip install
py-spy`; `--native`, per thread), and the decode scheduler, and prints time per request (per
decode step) by component and thread, and rnnserve beside bare per wire (bench/stacks.py); the
raw stacks stay in DIR.

The decode loop: a tiny seq2seq model (tokens, LSTM 16, no attention; <eos> made impossible so
every row runs to max_length) decoded by the engine's scheduler, 64 greedy requests at once,
against `Seq2SeqModel.step` in a bare loop over the same 64 rows (encode once, then step,
arg-max, tokens to the host): wall time per step, alternated rounds.

    .venv/bin/python -m bench.overhead [--duration 5] [--rounds 3] [--clients 1 64]
        [--wires json v2-json v2-binary grpc v2-grpc] [--generators 1] [--check-generators]
        [--profile DIR] [--decode-rounds 5] [--decode-steps 64] [--variant LABEL=CHECKOUT]

`--variant LABEL=CHECKOUT` adds another `rnnserve serve`, run from another checkout (its
service/ and models/ on the same interpreter), to every round: two trees compared side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench import stacks
from bench.grpc import METHODS, ROOT, run_client, start_server
from bench.http import LUA, free_port, start, stop, workload, write_bodies, wrk

MODEL = "tiny"
INPUT, HIDDEN = 32, 8
SEQUENCES = 128
DECODE_MODEL = "tiny-s2s"
DECODE_ROWS = 64
DECODE_REPEATS = 9  # runs of each side per decode round


@dataclass(frozen=True)
class Wire:
    """One way of sending the same encode request."""

    label: str
    transport: str  # "http" or "grpc"
    target: str  # the HTTP path, or bench.grpc's service ("v1", "v2")
    bodies: str = ""  # bench.http.write_bodies' mode (HTTP)


WIRES = {
    "json": Wire("rnnserve JSON", "http", f"/v1/models/{MODEL}/encode", "json"),
    "v2-json": Wire("V2 JSON", "http", f"/v2/models/{MODEL}/infer", "v2json"),
    "v2-binary": Wire("V2 binary", "http", f"/v2/models/{MODEL}/infer", "binary"),
    "grpc": Wire("rnnserve gRPC", "grpc", "v1"),
    "v2-grpc": Wire("V2 gRPC", "grpc", "v2"),
}


def tiny_config() -> Any:
    """The tiny encoder: LSTM 32 → 8, 1 layer; batches of up to 64, a deep queue."""
    from models.config import ModelConfig

    return ModelConfig.model_validate(
        {
            "format": "rnnserve/v1",
            "task": "encode",
            "input": {"type": "features", "size": INPUT},
            "encoder": {"cell": "lstm", "hidden_size": HIDDEN, "num_layers": 1},
            "serving": {"max_batch_size": 64, "max_queue_size": 4096},
        }
    )


# --- the bare server ----------------------------------------------------------------------------


def _answers() -> dict[str, tuple[bytes, list[tuple[bytes, bytes]]]]:
    """Fixed answers (body, headers) of the bare HTTP app, the size of rnnserve's."""
    encoding = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    v1 = orjson.dumps(
        {"model": MODEL, "version": 1, "encodings": encoding}, option=orjson.OPT_SERIALIZE_NUMPY
    )
    spec = {"name": "ENCODING", "datatype": "FP32", "shape": [1, HIDDEN]}
    head = {"model_name": MODEL, "model_version": "1"}
    v2_json = orjson.dumps(
        head | {"outputs": [spec | {"data": encoding.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY
    )
    v2_head = orjson.dumps(
        head | {"outputs": [spec | {"parameters": {"binary_data_size": encoding.nbytes}}]}
    )
    json_type = (b"content-type", b"application/json")
    binary_headers = [
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(v2_head)).encode()),
    ]
    return {
        "v1": (v1, [json_type]),
        "v2-json": (v2_json, [json_type]),
        "v2-binary": (v2_head + encoding.tobytes(), binary_headers),
        "ready": (b"ok", [(b"content-type", b"text/plain")]),
    }


def parse_json(body: bytes) -> Any:
    """The bare servers' JSON parse (a function of its own, for the profile)."""
    return orjson.loads(body)


def to_array(data: Any, shape: Any = None) -> np.ndarray:
    """The bare servers' conversion to float32 (bytes: a little-endian tensor, not copied)."""
    if isinstance(data, bytes | memoryview):
        return np.frombuffer(data, "<f4").reshape(shape)
    array = np.array(data, dtype=np.float32)
    return array if shape is None else array.reshape(shape)


def bare_app() -> Any:
    """The bare ASGI app: reads the body, parses it, answers a fixed message."""
    answers = _answers()
    encode_path, infer_path = WIRES["json"].target, WIRES["v2-json"].target

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        if path == encode_path:
            to_array(parse_json(body)["inputs"][0])
            answer = answers["v1"]
        elif path == infer_path:
            header_length = next(
                (v for k, v in scope["headers"] if k == b"inference-header-content-length"), None
            )
            if header_length is None:
                tensor = parse_json(body)["inputs"][0]
                to_array(tensor["data"], tensor["shape"])
                answer = answers["v2-json"]
            else:
                n = int(header_length)
                tensor = parse_json(body[:n])["inputs"][0]
                to_array(memoryview(body)[n:], tensor["shape"])
                answer = answers["v2-binary"]
        else:
            answer = answers["ready"]
        payload, headers = answer
        length = (b"content-length", str(len(payload)).encode())
        await send({"type": "http.response.start", "status": 200, "headers": [*headers, length]})
        await send({"type": "http.response.body", "body": payload})

    return app


def bare_grpc_handler() -> Any:
    """The bare gRPC services: Encode and ModelInfer parse their message, answer fixed bytes."""
    import grpc

    from rnnserve_client.proto.inference import grpc_service_pb2 as v2
    from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
    from service.grpc_api.convert import float_array, float_values

    encoding = np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32)
    encoded = pb.EncodeResponse(model=MODEL, version=1, encodings=[float_array(encoding)])
    inferred = v2.ModelInferResponse(model_name=MODEL, model_version="1")
    inferred.outputs.add(name="ENCODING", datatype="FP32", shape=[1, HIDDEN])
    inferred.raw_output_contents.append(encoding.tobytes())
    encode_answer, infer_answer = encoded.SerializeToString(), inferred.SerializeToString()

    async def encode(request: Any, context: Any) -> bytes:
        for sequence in request.inputs.sequences:
            float_values(sequence).reshape(tuple(sequence.shape))
        return encode_answer

    async def infer(request: Any, context: Any) -> bytes:
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            to_array(raw, tuple(tensor.shape))
        return infer_answer

    return (
        grpc.method_handlers_generic_handler(
            "rnnserve.v1.RnnServe",
            {
                "Encode": grpc.unary_unary_rpc_method_handler(
                    encode, request_deserializer=pb.EncodeRequest.FromString
                )
            },
        ),
        grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(
                    infer, request_deserializer=v2.ModelInferRequest.FromString
                )
            },
        ),
    )


def serve_bare(http_port: int, grpc_port: int) -> None:
    """`--bare`: the bare HTTP app and gRPC services on one uvloop loop, until SIGTERM."""
    import grpc
    import uvicorn
    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(bare_grpc_handler())
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
        config = uvicorn.Config(
            bare_app(),
            host="127.0.0.1",
            port=http_port,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
        await uvicorn.Server(config).serve()
        await server.stop(0)

    uvloop.run(main())


# --- servers, load and CPU time -------------------------------------------------------------------


@dataclass
class Server:
    """A server process under test: `rnnserve serve` (or a variant) or the bare one."""

    label: str
    process: subprocess.Popen[Any]
    http_port: int
    grpc_port: int
    # OS thread id → group ("loop", "device", "other"), from py-spy when installed
    groups: dict[int, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def py_spy() -> str | None:
    """The py-spy executable (beside this interpreter or on PATH), if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def thread_groups(pid: int) -> dict[int, str]:
    """OS thread id → "loop" (the main thread), "device" / "prefill" (rnnserve's executors) or
    "other", named by py-spy; without py-spy only the main thread is known."""
    groups = {pid: "loop"}
    spy = py_spy()
    if spy is None:
        return groups
    out = subprocess.run(
        [spy, "dump", "--pid", str(pid), "--json"], capture_output=True, text=True, timeout=60
    )
    if out.returncode:
        return groups
    for thread in orjson.loads(out.stdout):
        name = thread.get("thread_name") or ""
        tid = thread.get("os_thread_id")
        if tid is None:
            continue
        if name.startswith("rnnserve-prefill"):
            groups[tid] = "prefill"
        elif name.startswith("rnnserve-"):
            groups[tid] = "device"
    return groups


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_by_group(
    before: dict[int, float], after: dict[int, float], groups: dict[int, str]
) -> dict[str, float]:
    """CPU seconds spent between two `thread_cpu` readings, summed by thread group."""
    totals = {"loop": 0.0, "device": 0.0, "other": 0.0}
    for tid, seconds in after.items():
        group = groups.get(tid, "other")
        group = group if group in totals else "other"
        totals[group] += seconds - before.get(tid, 0.0)
    return totals


def start_rnnserve(label: str, repository: Path, checkout: Path) -> Server:
    """`rnnserve serve` from `checkout` on the tiny models (1 intra-op thread)."""
    process, grpc_port, http_port = start_server(repository, 1, "cpu", cwd=checkout)
    return Server(label, process, http_port, grpc_port, thread_groups(process.pid))


def start_bare() -> Server:
    """The bare server (`--bare`) as a subprocess."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "bench.overhead", "--bare", str(http_port), str(grpc_port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = start(command, f"http://127.0.0.1:{http_port}/readyz", env)
    return Server("bare", process, http_port, grpc_port, thread_groups(process.pid))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wrk_parallel(
    server: Server, wire: Wire, bodies: Path, script: Path, clients: int, seconds: float, k: int
) -> dict[str, Any]:
    """wrk by `k` processes sharing `clients` connections: requests add up, p50 is the median."""
    shares = [clients // k + (i < clients % k) for i in range(k)]
    shares = [c for c in shares if c]
    with ThreadPoolExecutor(len(shares)) as pool:
        parts = list(
            pool.map(
                lambda c: wrk(server.url, wire.target, bodies, script, c, seconds),
                shares,
            )
        )
    return {
        "rate": sum(p["rate"] for p in parts),
        "answered": sum(p["requests"] for p in parts),
        "errors": sum(p["status_errors"] + p["socket_errors"] for p in parts),
        "p50_ms": statistics.median(p["p50_us"] for p in parts) / 1000,
        "p99_ms": statistics.median(p["p99_us"] for p in parts) / 1000,
    }


# Time steps of the gRPC bodies h2load sends (one body per h2load process): the middles of the
# four quarters of 16..128, the varied workload's mean (72) and spread.
H2LOAD_STEPS = (30, 58, 86, 114)


def write_grpc_bodies(root: Path) -> None:
    """gRPC-framed request bodies (1 flag byte, 4-byte length, message) for h2load, one per
    H2LOAD_STEPS and service, from bench/grpc.py's messages."""
    from bench.grpc import _requests

    for service in ("v1", "v2"):
        messages = _requests(service, 512, MODEL)

        def steps(message: Any, service: str = service) -> int:
            if service == "v1":
                return int(message.inputs.sequences[0].shape[0])
            return int(message.inputs[0].shape[1])

        for k, wanted in enumerate(H2LOAD_STEPS):
            data = min(messages, key=lambda m, w=wanted: abs(steps(m) - w)).SerializeToString()
            framed = b"\x00" + len(data).to_bytes(4, "big") + data
            (root / f"grpc-{service}-{k}.bin").write_bytes(framed)


def h2load(server: Server, wire: Wire, clients: int, seconds: float, root: Path) -> dict[str, Any]:
    """gRPC load by h2load (nghttp2's HTTP/2 load generator, in C): one process per body of
    `write_grpc_bodies`, each one connection with its share of `clients` streams in flight.
    Its latency figure is the mean (h2load gives no percentiles)."""
    count = len(H2LOAD_STEPS)
    shares = [clients // count + (k < clients % count) for k in range(count)]
    running = []
    for k, share in enumerate(shares):
        if not share:
            continue
        command = ["h2load", "-D", str(round(seconds)), "-c", "1", "-m", str(share)]
        command += ["-d", str(root / f"grpc-{wire.target}-{k}.bin")]
        command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        command += [f"http://127.0.0.1:{server.grpc_port}{METHODS[wire.target]}"]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    rate = 0.0
    answered = errors = 0
    means = []
    for process in running:
        out, _ = process.communicate(timeout=seconds + 60)
        finished = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
        counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
        latency = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
        if finished is None or counts is None or latency is None:
            raise RuntimeError(f"h2load: no result in {out[-500:]!r}")
        rate += float(finished.group(1))
        answered += int(counts.group(1))
        errors += sum(int(counts.group(i)) for i in (2, 3, 4))
        means.append(_milliseconds(latency.group(1)))
    mean = statistics.mean(means)
    return {"rate": rate, "answered": answered, "errors": errors, "p50_ms": mean, "p99_ms": mean}


def _milliseconds(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def measure(
    server: Server,
    wire: Wire,
    clients: int,
    seconds: float,
    root: Path,
    generators: int = 1,
    generator: str = "auto",
) -> dict[str, Any]:
    """One load run: req/s, p50/p99, errors, the server's CPU µs per request by thread group and
    the load generators' CPU (cores busy over the run). HTTP load by wrk (`generators`
    processes); gRPC by h2load when installed and more than one call is in flight, else (or with
    `generator="python"`) by bench/grpc.py's client (`generators` processes)."""
    pid = server.process.pid
    before, children, start_at = thread_cpu(pid), _children_cpu(), time.perf_counter()
    use_h2load = generator == "h2load" or (
        generator == "auto" and clients > 1 and shutil.which("h2load") is not None
    )
    if wire.transport == "http":
        bodies = root / f"bodies-{wire.bodies}"
        r = _wrk_parallel(server, wire, bodies, root / "post.lua", clients, seconds, generators)
        r["generator"] = "wrk"
    elif use_h2load:
        r = h2load(server, wire, clients, seconds, root)
        r["generator"] = "h2load"
    else:
        g = run_client(server.grpc_port, wire.target, clients, seconds, generators, MODEL)
        r = {
            "rate": g["throughput"],
            "answered": g["sent"],
            "errors": g["errors"],
            "p50_ms": g["p50_ms"],
            "p99_ms": g["p99_ms"],
            "generator": "python",
        }
    wall = time.perf_counter() - start_at
    cpu = cpu_by_group(before, thread_cpu(pid), server.groups)
    answered = max(1, r["answered"])
    r["cpu_us"] = {group: 1e6 * s / answered for group, s in cpu.items()}
    r["generator_cores"] = (_children_cpu() - children) / wall
    return r


# --- the profile ------------------------------------------------------------------------------


def profile(
    server: Server, wire: Wire, clients: int, seconds: float, root: Path, folder: Path
) -> Path:
    """py-spy's raw stacks (per thread, native frames) of `server` under load; returns the file."""
    spy = py_spy()
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    kind = wire.bodies or f"grpc-{wire.target}"
    out = folder / f"{server.label}-{kind}-{clients}.txt"
    load = threading.Thread(
        target=measure, args=(server, wire, clients, seconds + 3, root), daemon=True
    )
    load.start()
    time.sleep(2)  # the load generator's start-up
    command = [spy, "record", "--pid", str(server.process.pid), "--duration", str(round(seconds))]
    command += ["--rate", "200", "--format", "raw", "--threads", "--native", "-o", str(out)]
    subprocess.run(command, capture_output=True, check=True, timeout=seconds + 120)
    stacks.symbolize(out, server.process.pid)
    load.join()
    return out


# --- the decode loop --------------------------------------------------------------------------


def write_decode_model(repository: Path, max_length: int) -> None:
    """The tiny seq2seq model (tests/factories.py's config): tokens in, LSTM 16, no attention;
    the output layer never picks <eos>, so every row decodes `max_length` tokens."""
    import torch

    from models.checkpoint import build_model, save
    from tests.factories import TARGET_VOCAB, make_config

    config = make_config(
        task="seq2seq",
        input_type="tokens",
        cell="lstm",
        hidden_size=16,
        max_length=max_length,
        serving={"max_batch_size": DECODE_ROWS},
    )
    torch.manual_seed(0)
    model = build_model(config)
    assert config.decoder is not None
    with torch.no_grad():
        model.decoder.output.bias[config.decoder.eos_id] = -1e4
    save(model, repository / DECODE_MODEL / "1", target_vocab=TARGET_VOCAB)


async def decode_compare(
    repository: Path, rounds: int, steps: int, profile_to: Path | None
) -> None:
    """Wall time per decode step of 64 greedy rows: the engine's scheduler against a bare loop of
    `Seq2SeqModel.step`, alternated rounds; with `profile_to`, py-spy samples the scheduler."""
    import torch
    from prometheus_client import CollectorRegistry

    from models.encoder import collate
    from models.seq2seq import Seq2SeqModel
    from service.core.engine import Engine
    from service.core.metrics import Metrics
    from service.core.settings import Settings
    from service.core.types import GenerateRequest

    torch.set_num_threads(1)
    settings = Settings(repository=repository, device="cpu", cpu_threads=1, models=[DECODE_MODEL])
    # NOTE: as `rnnserve serve` runs (service/process/serve.py): the device thread takes the GIL
    # back after every torch op, and the switch interval bounds its wait.
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    engine = Engine(settings, Metrics(CollectorRegistry()))
    await engine.start()
    model = engine.registry.resolve(DECODE_MODEL).loaded.model  # type: ignore[union-attr]
    assert isinstance(model, Seq2SeqModel)
    spec = model.decoder_spec
    rng = np.random.default_rng(0)
    sources = [rng.integers(4, 20, int(n)) for n in rng.integers(5, 30, DECODE_ROWS)]
    pid = os.getpid()

    def bare() -> tuple[float, float]:
        cpu = time.thread_time()
        start_at = time.perf_counter()
        with torch.inference_mode():
            inputs, lengths = collate([torch.from_numpy(s) for s in sources])
            state = model.encode(inputs, lengths)
            feed = torch.full((len(sources),), spec.bos_id, dtype=torch.int64)
            for _ in range(steps):
                log_probs, state = model.step(state, feed)
                feed = log_probs.argmax(dim=-1)
                feed.tolist()
        return time.perf_counter() - start_at, time.thread_time() - cpu

    async def device_time() -> float:
        # NOTE: the device thread's own clock (ns); /proc counts 10 ms ticks, a run's whole time.
        return (await engine.executor.run(time.thread_time))[0]

    async def scheduled() -> tuple[float, float, float]:
        device_cpu = await device_time()
        loop_cpu, start_at = time.thread_time(), time.perf_counter()
        results = await asyncio.gather(
            *(
                engine.generate(GenerateRequest(DECODE_MODEL, [s], "tokens", max_length=steps))
                for s in sources
            )
        )
        wall = time.perf_counter() - start_at
        loop_cpu = time.thread_time() - loop_cpu
        device_cpu = await device_time() - device_cpu
        assert all(len(r.outputs[0].tokens) == steps for r in results)
        return wall, loop_cpu, device_cpu

    bare()
    await scheduled()  # warm-up
    walls: dict[str, list[float]] = {"bare": [], "scheduler": []}
    cpus: dict[str, list[float]] = {"bare": [], "loop": [], "device": []}
    # NOTE: one run lasts ~10 ms, less than one time slice a loaded host may take away: a round
    # is the median of DECODE_REPEATS runs of each, alternated.
    for round_ in range(rounds):
        runs: dict[str, list[tuple[float, ...]]] = {"bare": [], "scheduler": []}
        for repeat in range(DECODE_REPEATS):
            first = (round_ + repeat) % 2 == 0
            for name in ("bare", "scheduler") if first else ("scheduler", "bare"):
                runs[name].append(bare() if name == "bare" else await scheduled())
        walls["bare"].append(statistics.median(r[0] for r in runs["bare"]))
        cpus["bare"].append(statistics.median(r[1] for r in runs["bare"]))
        walls["scheduler"].append(statistics.median(r[0] for r in runs["scheduler"]))
        cpus["loop"].append(statistics.median(r[1] for r in runs["scheduler"]))
        cpus["device"].append(statistics.median(r[2] for r in runs["scheduler"]))
    ratios = [s / b for s, b in zip(walls["scheduler"], walls["bare"], strict=True)]

    def per_step(values: list[float]) -> float:
        return 1e6 * statistics.median(values) / steps

    print(
        f"\nDecode loop: {DECODE_ROWS} greedy rows × {steps} steps (one encode included), "
        f"medians of {rounds} rounds (each the median of {DECODE_REPEATS} alternated runs)\n\n"
        "| | wall µs per step | CPU µs per step |\n|---|---:|---:|\n"
        f"| bare `Seq2SeqModel.step` loop | {per_step(walls['bare']):.0f} | "
        f"{per_step(cpus['bare']):.0f} (its thread) |\n"
        f"| scheduler (engine.generate × {DECODE_ROWS}) | {per_step(walls['scheduler']):.0f} | "
        f"{per_step(cpus['loop']):.0f} loop + {per_step(cpus['device']):.0f} device thread |\n\n"
        f"scheduler ÷ bare, wall per step: {statistics.median(ratios):.2f} "
        f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    if profile_to is not None:
        spy = py_spy()
        if spy is None:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        out = profile_to / "scheduler-decode.txt"
        command = [spy, "record", "--pid", str(pid), "--duration", "8", "--rate", "200"]
        command += ["--format", "raw", "--threads", "--native", "-o", str(out)]
        recorder = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        runs = 0
        end = time.perf_counter() + 9
        loop_cpu = device_cpu = 0.0
        while time.perf_counter() < end:
            _, loop_s, device_s = await scheduled()
            runs, loop_cpu, device_cpu = runs + 1, loop_cpu + loop_s, device_cpu + device_s
        await recorder.wait()
        stacks.symbolize(out, pid)
        per = {"loop": 1e6 * loop_cpu / (runs * steps), "device": 1e6 * device_cpu / (runs * steps)}
        print(f"\nScheduler profile ({out}), µs per decode step:\n")
        print(stacks.table(stacks.read(out), per, "step"))
    await engine.drain(5.0)


# --- orchestration ----------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]], wires: list[str], levels: list[int], label: str) -> str:
    """The Markdown tables: `label` against bare by wire and client count (req/s, p50; ratios
    are medians of the rounds' ratios), then CPU time per request by thread."""
    lines = [
        f"| wire | clients | load | {label} req/s | bare req/s | {label} ÷ bare req/s (rounds) "
        f"| bare ÷ {label}, loop CPU per request | {label} p50 ms | bare p50 ms "
        f"| p50 {label} − bare ms | errors |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    cpu_lines = [
        f"| wire | clients | {label} loop µs/req | bare loop µs/req | {label} device µs/req | "
        f"{label} other threads µs/req | bare other threads µs/req | load generator cores "
        f"({label}, bare) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def cpu(runs: list[dict[str, Any]], group: str) -> float:
        return statistics.median(r["cpu_us"][group] for r in runs)

    for name in wires:
        for clients in levels:
            ours = _runs(rows, name, clients, label)
            bare = _runs(rows, name, clients, "bare")
            if not ours or not bare:
                continue
            pairs = list(zip(ours, bare, strict=True))
            ratios = [a["rate"] / b["rate"] for a, b in pairs]
            loop = [b["cpu_us"]["loop"] / a["cpu_us"]["loop"] for a, b in pairs]
            gaps = [a["p50_ms"] - b["p50_ms"] for a, b in pairs]
            errors = sum(r["errors"] for r in ours + bare)
            means = " (means)" if ours[0]["generator"] == "h2load" else ""
            lines.append(
                f"| {WIRES[name].label} | {clients} | {ours[0]['generator']} | "
                f"{med(ours, 'rate'):.0f} | {med(bare, 'rate'):.0f} | "
                f"**{statistics.median(ratios):.2f}** ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                f"{statistics.median(loop):.2f} | {med(ours, 'p50_ms'):.2f} | "
                f"{med(bare, 'p50_ms'):.2f} | {statistics.median(gaps):+.2f}{means} | {errors} |"
            )
            cpu_lines.append(
                f"| {WIRES[name].label} | {clients} | {cpu(ours, 'loop'):.0f} | "
                f"{cpu(bare, 'loop'):.0f} | {cpu(ours, 'device'):.0f} | {cpu(ours, 'other'):.0f} | "
                f"{cpu(bare, 'other'):.0f} | {med(ours, 'generator_cores'):.2f}, "
                f"{med(bare, 'generator_cores'):.2f} |"
            )
    return (
        "\n".join(lines)
        + "\n\nCPU time per request, by thread (medians):\n\n"
        + "\n".join(cpu_lines)
    )


def _runs(rows: list[dict[str, Any]], wire: str, clients: int, label: str) -> list[dict[str, Any]]:
    return [r for r in rows if (r["wire"], r["clients"], r["server"]) == (wire, clients, label)]


def main() -> None:
    """Run the measurements and print Markdown tables for bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--wires", nargs="+", choices=list(WIRES), default=list(WIRES))
    parser.add_argument("--generators", type=int, default=1, help="load processes per run")
    parser.add_argument("--check-generators", action="store_true")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy each server (DIR)")
    parser.add_argument("--decode-rounds", type=int, default=5, help="0: no decode comparison")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=CHECKOUT")
    parser.add_argument("--bare", nargs=2, type=int, metavar=("HTTP_PORT", "GRPC_PORT"))
    args = parser.parse_args()
    if args.bare:
        serve_bare(*args.bare)
        return
    # NOTE: SIGTERM ends the run through `finally`, which stops the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.clients and args.wires and args.rounds:
            served(args, root)
        if args.decode_rounds:
            import uvloop

            repository = root / "decode-repository"
            write_decode_model(repository, args.decode_steps)
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
            uvloop.run(
                decode_compare(repository, args.decode_rounds, args.decode_steps, args.profile)
            )


def served(args: argparse.Namespace, root: Path) -> None:
    """The wire measurements: every server per wire and client count, alternated rounds."""
    import torch

    from models.checkpoint import build_model, save

    repository = root / "repository"
    torch.manual_seed(0)
    save(build_model(tiny_config()), repository / MODEL / "1")
    (root / "post.lua").write_text(LUA)
    sequences = workload("varied", SEQUENCES, seed=0)
    for mode in {WIRES[w].bodies for w in args.wires if WIRES[w].bodies}:
        write_bodies(root / f"bodies-{mode}", sequences, mode)
    write_grpc_bodies(root)
    variants = [v.split("=", 1) for v in args.variant]
    servers: list[Server] = []
    rows: list[dict[str, Any]] = []
    try:
        # NOTE: started inside the `try`, so that whatever fails stops the ones already running.
        servers.append(start_rnnserve("rnnserve", repository, ROOT))
        servers.append(start_bare())
        for label, path in variants:
            servers.append(start_rnnserve(label, repository, Path(path)))
        for server in servers:
            for name in args.wires:
                measure(server, WIRES[name], 16, 2, root)  # warm-up
        if args.check_generators:
            check_generators(servers[1], args, root)
        for round_ in range(args.rounds):
            for name in args.wires:
                for clients in args.clients:
                    order = servers if round_ % 2 == 0 else servers[::-1]
                    for server in order:
                        r = measure(
                            server, WIRES[name], clients, args.duration, root, args.generators
                        )
                        r |= {"server": server.label, "wire": name, "clients": clients}
                        rows.append(r)
                        print(
                            f"round {round_ + 1} {WIRES[name].label:14} {clients:3} clients "
                            f"{server.label:10} {r['rate']:7.0f} req/s p50 {r['p50_ms']:6.2f} ms "
                            f"loop {r['cpu_us']['loop']:5.0f} µs/req "
                            f"generator {r['generator_cores']:.2f} cores",
                            flush=True,
                        )
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
        for label in [s.label for s in servers if s.label != "bare"]:
            print(summary(rows, args.wires, args.clients, label) + "\n")
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            top = max(args.clients)
            for name in args.wires:
                profiles = {}
                for server in servers:
                    out = profile(server, WIRES[name], top, args.duration, root, args.profile)
                    runs = _runs(rows, name, top, server.label)
                    per = {
                        group: statistics.median(r["cpu_us"][group] for r in runs)
                        for group in ("loop", "device")
                    }
                    profiles[server.label] = (stacks.read(out), per)
                    table = stacks.table(profiles[server.label][0], per, "request")
                    print(
                        f"\n{server.label}, {WIRES[name].label}, {top} clients ({out.name}), "
                        f"µs per request:\n\n{table}"
                    )
                loops = {
                    label: (samples, per["loop"]) for label, (samples, per) in profiles.items()
                }
                table = stacks.compare(loops, "loop", "req")
                print(f"\n{WIRES[name].label}, {top} clients:\n\n{table}")
    finally:
        for server in servers:
            stop(server.process)  # type: ignore[arg-type]


def check_generators(bare: Server, args: argparse.Namespace, root: Path) -> None:
    """Load generators against the bare server at the highest client count, each twice: one
    wrk against two for HTTP; for gRPC one and two Python client processes, and h2load."""
    top = max(args.clients)
    print(
        f"\nLoad generators against the bare server, {top} clients:\n\n"
        "| wire | generator | req/s | bare loop CPU µs/req | generator cores |\n"
        "|---|---|---:|---:|---:|"
    )
    for name in args.wires:
        wire = WIRES[name]
        if wire.transport == "http":
            kinds = [("wrk", 1, "wrk"), ("2 × wrk", 2, "wrk")]
        else:
            kinds = [("Python client", 1, "python"), ("2 × Python client", 2, "python")]
            if shutil.which("h2load"):
                kinds.append(("h2load", 1, "h2load"))
        for label, count, generator in kinds * 2:
            r = measure(bare, wire, top, args.duration, root, count, generator)
            print(
                f"| {wire.label} | {label} | {r['rate']:.0f} | {r['cpu_us']['loop']:.0f} | "
                f"{r['generator_cores']:.2f} |"
            )
    print(flush=True)


if __name__ == "__main__":
    main()
