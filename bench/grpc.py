"""gRPC throughput and latency of `rnnserve serve` against direct batch-64 model calls.

Reference workload: a 2-layer LSTM (input 32, hidden 256), one sequence per request, lengths
uniform in 16..128. For each service (rnnserve.v1 Encode; V2 ModelInfer with raw contents) and
each concurrency (1, 16, 64), a separate load-generating process (this script with --client)
keeps that many calls in flight for --duration seconds and reports throughput, p50 and p99;
like wrk, it sends pre-serialised messages and leaves answers unparsed (grpc.aio on uvloop).
The baseline is measured in the same run: the same checkpoint called directly in this process
with packed batches of 64 such sequences, on the same number of CPU threads as the server.

    .venv/bin/python -m bench.grpc [--duration 5] [--threads N] [--device cpu]
    .venv/bin/python -m bench.grpc --compare-age 1 --rounds 5   # + the same with 1 s ageing

With --compare-age S two servers run side by side, one that never ages its connections and one
that ends each after S seconds (--grpc-max-connection-age-s), and every measurement alternates
between them: what connection ageing costs, in the same run.

(As a module: run as a file, its folder would come first on sys.path and this file and
bench/http.py would shadow the grpc and http packages.)

Prints a Markdown table (paste into bench/RESULTS.md) and writes JSON with --json PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# NOTE: bench.baseline.INPUT, not imported: this module's load generator stays free of torch.
INPUT = 32
MIN_LEN, MAX_LEN = 16, 128
BATCH = 64
MODEL = "reference"


def _lengths(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(MIN_LEN, MAX_LEN + 1, n)]


def write_reference(repository: Path) -> Path:
    """The reference checkpoint (random weights, fixed seed) in repository/reference/1."""
    import torch

    from bench.baseline import reference_config
    from models.checkpoint import build_model, save

    config = reference_config()
    torch.manual_seed(0)
    return save(build_model(config), repository / MODEL / "1")


def direct_baseline(folder: Path, threads: int, device: str, seconds: float) -> dict[str, float]:
    """Sequences/s of direct packed batch-64 calls of the loaded checkpoint (median batch
    time)."""
    import torch

    from bench.baseline import packed_encode
    from models.checkpoint import load
    from models.encoder import EncoderModel, collate

    torch.set_num_threads(threads)
    loaded = load(folder, device=device)
    assert isinstance(loaded.model, EncoderModel)
    rng = np.random.default_rng(1)
    times: list[float] = []
    end = time.perf_counter() + seconds
    with torch.inference_mode():
        while time.perf_counter() < end or len(times) < 5:
            batch = [torch.randn(t, INPUT) for t in _lengths(rng, BATCH)]
            inputs, lengths = collate(batch)
            start = time.perf_counter()
            packed_encode(loaded.model, inputs.to(device), lengths).cpu()
            times.append(time.perf_counter() - start)
    median = statistics.median(times[1:])
    return {"batch_s": median, "sequences_per_s": BATCH / median, "batches": len(times)}


# --- the load-generating process ---------------------------------------------------------------


def _requests(service: str, n: int, model: str = MODEL) -> list[Any]:
    from rnnserve_client.proto.inference import grpc_service_pb2 as v2
    from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb

    rng = np.random.default_rng(2)
    messages: list[Any] = []
    for t in _lengths(rng, n):
        x = rng.normal(size=(t, INPUT)).astype(np.float32)
        if service == "v1":
            message = pb.EncodeRequest(model=model)
            message.inputs.sequences.add(shape=x.shape, values=x.ravel().tolist())
        else:
            message = v2.ModelInferRequest(model_name=model)
            message.inputs.add(name="INPUT", datatype="FP32", shape=[1, t, INPUT])
            message.raw_input_contents.append(x.astype("<f4").tobytes())
        messages.append(message)
    return messages


METHODS = {"v1": "/rnnserve.v1.RnnServe/Encode", "v2": "/inference.GRPCInferenceService/ModelInfer"}


async def _load(
    port: int, service: str, concurrency: int, duration: float, model: str = MODEL
) -> dict[str, Any]:
    import grpc

    # NOTE: like wrk for HTTP, the load generator sends pre-serialised messages and does not
    # parse the answers (no serializers on the call), so that it takes as little as possible
    # of the cores it shares with the server.
    messages = [m.SerializeToString() for m in _requests(service, 512, model)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHODS[service])
        latencies: list[float] = []
        errors = sent = 0
        warmup_end = time.perf_counter() + min(1.0, duration / 4)
        end = warmup_end + duration

        async def worker(k: int) -> None:
            nonlocal errors, sent
            i = k
            while (now := time.perf_counter()) < end:
                try:
                    await call(messages[i % len(messages)], timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                sent += 1
                done = time.perf_counter()
                if now >= warmup_end:
                    latencies.append(done - now)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "sent": sent,  # calls answered, the warm-up's included
        "errors": errors,
        "throughput": len(latencies) / duration,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def client_main(args: argparse.Namespace) -> int:
    """--client: generate load and print one JSON line."""
    load = _load(args.port, args.service, args.concurrency, args.duration, args.model)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(load)
    else:
        result = uvloop.run(load)
    print(json.dumps(result), flush=True)
    return 0


# --- orchestration -----------------------------------------------------------------------------


def start_server(
    repository: Path, threads: int, device: str, flags: tuple[str, ...] = (), cwd: Path = ROOT
) -> tuple[subprocess.Popen[str], int, int]:
    """`rnnserve serve` as a subprocess (`flags` added; run from `cwd`, a checkout), its gRPC
    port and its HTTP port (read from the startup summary)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.process.cli",
            "serve",
            "--repository",
            str(repository),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--cpu-threads",
            str(threads),
            "--device",
            device,
            "--log-format",
            "json",
            *flags,
        ],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )
    port: list[int] = []
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if '"server.ready"' in line:
                summary = json.loads(line)
                port.extend([summary["grpc_port"], summary["http_port"]])
                ready.set()
        ready.set()

    # NOTE: keeps reading stderr after startup so the server never blocks on a full pipe.
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120) or not port:
        process.kill()
        raise SystemExit("the server did not become ready:\n" + "".join(lines[-20:]))
    return process, port[0], port[1]


def _batches(http_port: int) -> tuple[float, float, float]:
    """(model calls, sequences, compute seconds) of the reference model so far (/metrics)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=30).text
    names = (
        "rnnserve_batch_size_count",
        "rnnserve_batch_size_sum",
        "rnnserve_compute_duration_seconds_sum",
    )
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in values and f'model="{MODEL}"' in line:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values[names[0]], values[names[1]], values[names[2]]


def run_client(
    port: int,
    service: str,
    level: int,
    duration: float,
    processes: int = 1,
    model: str = MODEL,
) -> dict[str, Any]:
    """One measurement by `processes` separate load-generating processes sharing `level` calls
    in flight: their requests and throughputs add up; p50 and p99 are their medians."""
    counts = [level // processes + (k < level % processes) for k in range(processes)]
    running = []
    for concurrency in (c for c in counts if c):
        command = [sys.executable, "-m", "bench.grpc", "--client", "--port", str(port)]
        command += ["--service", service, "--concurrency", str(concurrency)]
        command += ["--duration", str(duration), "--model", model]
        running.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    parts = []
    for process in running:
        out, _ = process.communicate(timeout=duration * 4 + 60)
        if process.returncode:
            raise RuntimeError(f"the load generator failed (exit {process.returncode})")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    added = ("requests", "sent", "errors", "throughput")
    row: dict[str, Any] = {key: sum(part[key] for part in parts) for key in added}
    for key in ("p50_ms", "p99_ms"):
        row[key] = statistics.median(part[key] for part in parts)
    return row | {"service": service, "concurrency": level, "processes": len(parts)}


def main() -> int:
    """Run the whole benchmark (or, with --client, one load generator)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--service", choices=["v1", "v2"], default="v1", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per service and level")
    parser.add_argument(
        "--compare-age",
        type=float,
        metavar="S",
        help="also measure a server that ages connections after S s (alternating, same run)",
    )
    args = parser.parse_args()
    if not __package__:
        raise SystemExit("run from the repository root as a module: python -m bench.grpc")
    if args.client:
        return client_main(args)

    configs: dict[str, tuple[str, ...]] = {"default": ()}
    if args.compare_age is not None:
        configs = {
            "never": ("--grpc-max-connection-age-s", "inf"),
            f"{args.compare_age:g} s": ("--grpc-max-connection-age-s", str(args.compare_age)),
        }
    # NOTE: the machine may be shared, so the baseline is measured before the load and after
    # each level (the server idle meanwhile), and ratios use the median of those runs.
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        folder = write_reference(repository)
        baselines = [direct_baseline(folder, args.threads, args.device, args.duration)]
        servers = {
            name: start_server(repository, args.threads, args.device, flags)
            for name, flags in configs.items()
        }
        rows: list[dict[str, Any]] = []
        try:
            # NOTE: services (and servers) alternate within each level so that load changes hit
            # them alike.
            for level in (int(x) for x in args.levels.split(",")):
                for service, round_ in itertools.product(("v1", "v2"), range(args.rounds)):
                    for name, (_, port, http_port) in servers.items():
                        calls, sequences, busy = _batches(http_port)
                        row = run_client(port, service, level, args.duration)
                        calls_after, sequences_after, busy_after = _batches(http_port)
                        done = max(1.0, sequences_after - sequences)
                        row["mean_batch"] = (sequences_after - sequences) / max(
                            1.0, calls_after - calls
                        )
                        # Device time per sequence inside the server (batch compute ÷ sequences).
                        row["compute_ms_per_seq"] = 1000 * (busy_after - busy) / done
                        row["connection_age"], row["round"] = name, round_
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
                baselines.append(direct_baseline(folder, args.threads, args.device, args.duration))
        finally:
            for process, _, _ in servers.values():
                process.terminate()
                process.wait(60)
    direct = statistics.median(b["sequences_per_s"] for b in baselines)
    for row in rows:
        row["ratio"] = row["throughput"] / direct

    names = {"v1": "rnnserve.v1 Encode", "v2": "V2 ModelInfer (raw)"}
    runs = ", ".join(f"{b['sequences_per_s']:.0f}" for b in baselines)
    print(
        f"direct batch-{BATCH} calls ({args.threads} thread(s), {args.device}): median "
        f"{direct:.0f} seq/s = {1000 / direct:.2f} ms/seq, of runs {runs} (before the server "
        "ran and after each level)\n"
    )
    aged = args.compare_age is not None
    print(
        "| service | clients |" + (" connection age |" if aged else "") + " req/s | p50 ms | "
        "p99 ms | errors | mean batch | compute ms/seq | ratio to direct |"
    )
    print("|---|---:|" + ("---|" if aged else "") + "---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        age = f" {row['connection_age']} |" if aged else ""
        print(
            f"| {names[row['service']]} | {row['concurrency']} |{age} {row['throughput']:.0f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} | "
            f"{row['mean_batch']:.1f} | {row['compute_ms_per_seq']:.2f} | {row['ratio']:.2f} |"
        )
    if aged:
        # Aged ÷ never-aged throughput of each round (same run, alternated), then their median.
        print()
        for service, level in sorted({(r["service"], r["concurrency"]) for r in rows}):
            ratios = []
            for round_ in range(args.rounds):
                pair = {
                    r["connection_age"]: r["throughput"]
                    for r in rows
                    if (r["service"], r["concurrency"], r["round"]) == (service, level, round_)
                }
                ratios.append(pair[f"{args.compare_age:g} s"] / pair["never"])
            print(
                f"{names[service]}, {level} clients: aged / never throughput, median "
                f"{statistics.median(ratios):.3f} of {', '.join(f'{x:.3f}' for x in ratios)}"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"direct_seq_per_s": direct, "baselines": baselines, "rows": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
