"""HTTP front-end benchmark (run as a module: `python -m bench.http`; as a script, bench/http.py
would shadow the standard library's `http` package).

The reference workload: a 2-layer LSTM (input 32, hidden 256), one sequence per request, lengths
uniform in 16–128 ("varied") or all 64 ("fixed"). A real `rnnserve serve` process is driven by
wrk (a separate load generator; `apt-get install wrk`) over loopback, with a Lua script posting
pre-built bodies: rnnserve's JSON API and the V2 binary tensor extension, at 1, 16 and 64
connections. Throughput is reported as a ratio of direct batch-64 model calls measured in the same
run (right before and after each server run, averaged); latency p50/p99 come from wrk, the mean
batch size from the server's own rnnserve_batch_size histogram. A plain per-request FastAPI
server (model called in the handler, same JSON codec) is the 1-client latency reference. The
JSON codec cost per request is measured against the plain-Python path (json + pydantic + tolist).

    .venv/bin/python -m bench.http [--duration 8] [--threads 1] [--sequences 128] [--repeats 3]
        [--workloads varied fixed] [--protocols json binary] [--clients 1 16 64]
        [--dtype bfloat16] [--rounds 1]

The 1-client latency comparison runs when the JSON protocol at 1 client is among the runs.
With `--dtype bfloat16` (or float16) a second server runs in that dtype beside the float32 one
(the idle one waits), every run goes to both in alternated order, and a last table gives the
ratios (medians over `--rounds`, each round's ratio listed) with the reduced-precision server's
device-busy fraction: under 100 % its front-end, not the kernel, holds the figure back, and
req/s ÷ busy is what a fully busy device would give.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client.parser import text_string_to_metric_families

from bench.baseline import HIDDEN, INPUT, packed_encode, reference_config
from models import checkpoint
from models.encoder import EncoderModel, collate

MODEL = "lstm"
CONCURRENCY = (1, 16, 64)
MODES = ["json", "binary"]

LUA = r"""
local bodies, hlens, idx, path = {}, {}, 0, "/"
init = function(args)
  local dir = args[1]
  path = args[2]
  for line in io.lines(dir .. "/index.txt") do
    local name, hl = line:match("(%S+) (%S+)")
    local f = io.open(dir .. "/" .. name, "rb")
    bodies[#bodies + 1] = f:read("*a")
    f:close()
    hlens[#hlens + 1] = hl
  end
  idx = math.random(#bodies)
end
request = function()
  idx = idx % #bodies + 1
  local headers = {}
  if hlens[idx] ~= "0" then
    headers["Inference-Header-Content-Length"] = hlens[idx]
  else
    headers["Content-Type"] = "application/json"
  end
  return wrk.format("POST", path, headers, bodies[idx])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def write_reference_model(repository: Path) -> Path:
    """Write the reference checkpoint (random weights, seed 0) through the real save()."""
    torch.manual_seed(0)
    model = checkpoint.build_model(reference_config())
    return checkpoint.save(model, repository / MODEL / "1")


def workload(kind: str, count: int, seed: int) -> list[np.ndarray]:
    """`count` float32 [T, 32] sequences: T uniform in 16..128 (varied) or 64 (fixed)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 129, count) if kind == "varied" else np.full(count, 64)
    return [rng.standard_normal((int(n), INPUT)).astype(np.float32) for n in lengths]


def direct_rate(path: Path, sequences: list[np.ndarray], repeats: int) -> float:
    """Median sequences/s of direct packed batch-64 model calls (no server) over `sequences`."""
    model = checkpoint.load(path).model
    assert isinstance(model, EncoderModel)
    batches = [
        collate([torch.from_numpy(s) for s in sequences[i : i + 64]])
        for i in range(0, len(sequences), 64)
    ]

    def run() -> None:
        with torch.inference_mode():
            for inputs, lengths in batches:
                packed_encode(model, inputs, lengths)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return len(sequences) / statistics.median(times)


def write_bodies(folder: Path, sequences: list[np.ndarray], mode: str) -> None:
    """One request body per sequence, plus index.txt ("file header-length", 0 = plain JSON).
    Modes: "json" (rnnserve's encode body), "v2json" (V2 infer, flat JSON data), "binary" (V2
    infer, the binary tensor extension)."""
    folder.mkdir(parents=True)
    lines = []
    for i, seq in enumerate(sequences):
        if mode == "json":
            body, header_length = (
                orjson.dumps({"inputs": [seq]}, option=orjson.OPT_SERIALIZE_NUMPY),
                0,
            )
        elif mode == "v2json":
            tensor = {"name": "INPUT", "datatype": "FP32", "shape": [1, *seq.shape]}
            body = orjson.dumps(
                {"inputs": [tensor | {"data": seq.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY
            )
            header_length = 0
        else:
            head = orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "INPUT",
                            "datatype": "FP32",
                            "shape": [1, *seq.shape],
                            "parameters": {"binary_data_size": seq.nbytes},
                        }
                    ],
                    "parameters": {"binary_data_output": True},
                }
            )
            body, header_length = head + seq.tobytes(), len(head)
        (folder / f"{i}.bin").write_bytes(body)
        lines.append(f"{i}.bin {header_length}")
    (folder / "index.txt").write_text("\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(command: list[str], url: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a server process and wait until `url` answers 200."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {command}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become ready: {command}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wrk(
    url: str, path: str, bodies: Path, script: Path, clients: int, seconds: float
) -> dict[str, Any]:
    """Run wrk (1 thread, `clients` connections) and return its RESULT line."""
    command = [
        "wrk", "-t1", f"-c{clients}", f"-d{round(seconds)}s", "--timeout", "10s",
        "-s", str(script), url, "--", str(bodies), path,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def batch_totals(url: str) -> tuple[float, float, float]:
    """(sequences, model calls, compute seconds) so far, from the server's metrics."""
    total = calls = seconds = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if family.name == "rnnserve_batch_size" and sample.name.endswith("_sum"):
                total += sample.value
            elif family.name == "rnnserve_batch_size" and sample.name.endswith("_count"):
                calls += sample.value
            elif family.name == "rnnserve_compute_duration_seconds" and sample.name.endswith(
                "_sum"
            ):
                seconds += sample.value
    return total, calls, seconds


def codec_costs(sequence: np.ndarray, number: int = 200) -> dict[str, float]:
    """Median µs per request to parse one sequence and serialise one 256-float encoding."""
    from pydantic import TypeAdapter

    from service.http_api import json_codecs as codecs
    from service.http_api.bodies import read_body
    from service.http_api.schemas import EncodeBody
    from service.http_api.v1_routes import plain_encode, request_sequences

    body = orjson.dumps({"inputs": [sequence]}, option=orjson.OPT_SERIALIZE_NUMPY)
    encoding = np.random.default_rng(0).standard_normal((1, HIDDEN)).astype(np.float32)
    adapter = TypeAdapter(list[list[list[float]]])

    def plain() -> None:
        value = adapter.validate_python(json.loads(body)["inputs"])
        np.array(value[0], dtype=np.float32)
        json.dumps({"model": MODEL, "version": 1, "encodings": encoding.tolist()}).encode()

    def fast() -> None:
        request_sequences(read_body(EncodeBody, body, None, plain_encode), 1024)
        codecs.dumps({"model": MODEL, "version": 1, "encodings": encoding})

    out = {}
    for name, fn in (("plain", plain), ("fast", fast)):
        runs = timeit.repeat(fn, number=number, repeat=7)
        out[name] = statistics.median(runs) / number * 1e6
    return out


def serve_per_request(repository: Path, port: int, threads: int) -> None:
    """A plain per-request FastAPI server: the model is called in the handler, no batching."""
    torch.set_num_threads(threads)
    model = checkpoint.load(repository / MODEL / "1").model
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> Response:
        return Response(b"ok")

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        value = orjson.loads(await request.body())["inputs"]
        inputs = torch.tensor(value, dtype=torch.float32)
        lengths = torch.tensor([inputs.shape[1]] * inputs.shape[0])
        with torch.inference_mode():
            out = model(inputs, lengths).encodings.numpy()
        payload = {"model": MODEL, "version": 1, "encodings": out}
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    """Run every measurement and print the tables (Markdown) for bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sequences", type=int, default=128, help="distinct bodies per workload")
    parser.add_argument("--repeats", type=int, default=3, help="direct-call repeats per run")
    parser.add_argument(
        "--workloads", nargs="+", choices=["varied", "fixed"], default=["varied", "fixed"]
    )
    parser.add_argument("--protocols", nargs="+", choices=["json", "binary"], default=MODES)
    parser.add_argument("--clients", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="other than float32: a second server in this dtype, measured beside float32",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each configuration (dtypes alternated)"
    )
    parser.add_argument("--per-request-server", nargs=2, metavar=("REPOSITORY", "PORT"))
    args = parser.parse_args()
    if args.per_request_server:
        serve_per_request(
            Path(args.per_request_server[0]), int(args.per_request_server[1]), args.threads
        )
        return
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = write_reference_model(root / "repository")
        script = root / "post.lua"
        script.write_text(LUA)
        sets = {
            kind: workload(kind, args.sequences, seed=i)
            for i, kind in enumerate(("varied", "fixed"))
            if kind in args.workloads
        }
        for kind, seqs in sets.items():
            for mode in MODES:
                write_bodies(root / f"{kind}-{mode}", seqs, mode)

        costs = codec_costs(workload("fixed", 1, seed=1)[0])
        print(
            f"\ncodec, one 64×32 sequence in + one 256-float encoding out: plain Python "
            f"{costs['plain']:.0f} µs, rnnserve codecs {costs['fast']:.0f} µs "
            f"({costs['plain'] / costs['fast']:.1f}× faster)"
        )

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        dtypes = list(dict.fromkeys(["float32", args.dtype]))
        servers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        for dtype in dtypes:
            port = free_port()
            command = [
                sys.executable, "-m", "service.process.cli", "serve",
                "--repository", str(root / "repository"), "--http-port", str(port),
                "--grpc-port", "0", "--device", "cpu", "--cpu-threads", str(args.threads),
                "--log-level", "WARNING", "--dtype", dtype,
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            servers[dtype] = (url, start(command, f"{url}/readyz", env))
        rows = []
        print(f"\n{TABLE_HEAD}", flush=True)
        try:
            paths = {"json": f"/v1/models/{MODEL}/encode", "binary": f"/v2/models/{MODEL}/infer"}
            first_set = next(iter(sets))
            for url, _ in servers.values():
                wrk(url, paths["json"], root / f"{first_set}-json", script, 16, 3)  # warm-up

            def run_once(
                url: str, kind: str, mode: str, clients: int, seqs: list[np.ndarray]
            ) -> dict[str, Any]:
                # NOTE: direct calls are measured right before and after each server run, so
                # that every ratio pairs figures of the same (shared, noisy) time.
                first = direct_rate(path, seqs, args.repeats)
                before = batch_totals(url)
                bodies = root / f"{kind}-{mode}"
                r = wrk(url, paths[mode], bodies, script, clients, args.duration)
                after = batch_totals(url)
                r["limit"] = (first + direct_rate(path, seqs, args.repeats)) / 2
                r["batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                r["busy"] = (after[2] - before[2]) / (r["duration_us"] / 1e6)
                return r

            # NOTE: with two dtypes the servers take turns going first, round after round.
            turn = 0
            for kind, seqs in sets.items():
                for mode in args.protocols:
                    for clients in args.clients:
                        for _ in range(args.rounds):
                            turn += 1
                            for dtype in dtypes if turn % 2 else dtypes[::-1]:
                                r = run_once(servers[dtype][0], kind, mode, clients, seqs)
                                r["dtype"] = dtype
                                rows.append((kind, mode, clients, r))
                                print(table_row(kind, mode, clients, r, r["limit"]), flush=True)
        finally:
            for _, server in servers.values():
                stop(server)
        if len(dtypes) > 1:
            print(f"\n{DTYPE_HEAD.format(dtype=args.dtype)}")
            for kind, mode, clients in dict.fromkeys((k, m, c) for k, m, c, _ in rows):
                runs = [x for k, m, c, x in rows if (k, m, c) == (kind, mode, clients)]
                print(dtype_row(kind, mode, clients, runs, args.dtype))
        rows = [row for row in rows if row[3]["dtype"] == "float32"]
        if not any(m == "json" and c == 1 for _, m, c, _ in rows):
            return

        baseline_port = free_port()
        baseline_url = f"http://127.0.0.1:{baseline_port}"
        command = [
            sys.executable, "-m", "bench.http", "--threads", str(args.threads),
            "--per-request-server", str(root / "repository"), str(baseline_port),
        ]  # fmt: skip
        baseline = start(command, f"{baseline_url}/readyz", env)
        print(f"\n{LATENCY_HEAD}")
        try:
            for kind in sets:
                r = wrk(baseline_url, "/encode", root / f"{kind}-json", script, 1, args.duration)
                ours = next(x for k, m, c, x in rows if k == kind and m == "json" and c == 1)
                errors = r["status_errors"] + r["socket_errors"]
                print(
                    f"| {kind} | {r['p50_us'] / 1000:.2f} | {ours['p50_us'] / 1000:.2f} | "
                    f"{(ours['p50_us'] - r['p50_us']) / 1000:+.2f} | {errors} |"
                )
        finally:
            stop(baseline)


TABLE_HEAD = (
    "| workload | protocol | clients | dtype | req/s | direct batch-64 seq/s | ratio | p50 ms "
    "| p99 ms | mean batch | device busy | errors |\n"
    "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)
DTYPE_HEAD = (
    "| workload | protocol | clients | float32 req/s | {dtype} req/s | req/s ratio (per round) "
    "| p50 ratio "
    "| float32 device busy | {dtype} device busy | ratio at a busy device |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)
LATENCY_HEAD = (
    "| workload | per-request server p50 ms (1 client) | rnnserve JSON p50 ms (1 client) "
    "| difference ms | errors (per-request) |\n|---|---:|---:|---:|---:|"
)


def dtype_row(kind: str, mode: str, clients: int, runs: list[dict[str, Any]], dtype: str) -> str:
    """One Markdown row of the dtype table: medians over rounds, ratios per round."""
    base = [r for r in runs if r["dtype"] == "float32"]
    other = [r for r in runs if r["dtype"] == dtype]
    pairs = list(zip(base, other, strict=True))

    def median(values: list[float]) -> float:
        return statistics.median(values)

    rate = [b["rate"] / a["rate"] for a, b in pairs]
    p50 = [b["p50_us"] / a["p50_us"] for a, b in pairs]
    ceiling = [b["rate"] / max(b["busy"], 1e-9) / a["rate"] for a, b in pairs]
    protocol = "JSON" if mode == "json" else "V2 binary"
    return (
        f"| {kind} | {protocol} | {clients} | {median([r['rate'] for r in base]):.1f} | "
        f"{median([r['rate'] for r in other]):.1f} | {median(rate):.2f} "
        f"({', '.join(f'{x:.2f}' for x in rate)}) | {median(p50):.2f} | "
        f"{100 * median([r['busy'] for r in base]):.0f} % | "
        f"{100 * median([r['busy'] for r in other]):.0f} % | {median(ceiling):.2f} |"
    )


def table_row(kind: str, mode: str, clients: int, r: dict[str, Any], limit: float) -> str:
    """One Markdown row of the throughput table."""
    protocol = "JSON" if mode == "json" else "V2 binary"
    errors = r["status_errors"] + r["socket_errors"]
    p50, p99 = r["p50_us"] / 1000, r["p99_us"] / 1000
    return (
        f"| {kind} | {protocol} | {clients} | {r['dtype']} | {r['rate']:.1f} | {limit:.1f} | "
        f"{r['rate'] / limit:.2f} | {p50:.1f} | {p99:.1f} | {r['batch']:.1f} | "
        f"{100 * r['busy']:.0f} % | {errors} |"
    )


if __name__ == "__main__":
    main()
