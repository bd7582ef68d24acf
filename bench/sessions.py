"""Benchmark: many concurrent streaming sessions, chunk throughput and latency, batched or not.

    .venv/bin/python bench/sessions.py [--sessions 256] [--chunk 10] [--chunks 20] [--device cpu]

Every session streams its own random feature sequence in chunks of `--chunk` steps through the
real engine (SessionManager → encode batcher → executor). Modes, each on a fresh engine:
- `batched`: the model's `serving.max_batch_size` = number of sessions, so chunks of different
  sessions share model calls (their states gathered into one batch and scattered back);
- `unbatched`: `max_batch_size` = 1: the same concurrent clients, one chunk per model call (what
  serving one session at a time costs);
- `tokens`: batched, stateless: every chunk carries the portable state token in and out.
Reports chunk throughput (chunks/s) and latency percentiles per mode, the batched/unbatched
throughput ratio measured in the same run, and the model call's own ratio (a chunk's row alone
vs inside a batch of half / all the sessions: what batching can gain by compute alone).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# NOTE: `python bench/sessions.py` puts bench/ first on the path, where bench/http.py would
# shadow the standard library's `http`; the repository root replaces it.
sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from models.checkpoint import build_model, save  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from service.core.engine import Engine  # noqa: E402
from service.core.metrics import Metrics  # noqa: E402
from service.core.settings import Settings  # noqa: E402


def model_config(args: argparse.Namespace, max_batch_size: int) -> ModelConfig:
    """The benchmark's model shape with the given batch limit."""
    return ModelConfig.model_validate(
        {
            "format": "rnnserve/v1",
            "task": "encode",
            "input": {"type": "features", "size": args.features},
            "encoder": {"cell": args.cell, "hidden_size": args.hidden, "num_layers": args.layers},
            "pooling": "mean",
            "serving": {
                "max_batch_size": max_batch_size,
                "max_delay_ms": args.max_delay_ms,
                "max_queue_size": max(1024, 4 * args.sessions),
            },
        }
    )


def write_model(repository: Path, args: argparse.Namespace, max_batch_size: int) -> None:
    """A random-weight model of the benchmark's shape with the given batch limit."""
    torch.manual_seed(0)
    save(build_model(model_config(args, max_batch_size)), repository / "bench" / "1")


async def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Stream every session's chunks concurrently on a fresh engine; return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        write_model(repository, args, 1 if mode == "unbatched" else args.sessions)
        settings = Settings(
            repository=repository,
            device=args.device,
            cpu_threads=args.threads,
            state_key=SecretStr(secrets.token_urlsafe(32)),
            max_sessions=args.sessions,
        )
        # As `rnnserve serve` does at start-up (service/process/serve.py): the compute thread takes
        # the GIL back after every torch op, and this bounds its wait for a busy event loop.
        sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
        engine = Engine(settings, Metrics(CollectorRegistry()))
        await engine.start()
        sessions = engine.sessions
        rng = np.random.default_rng(0)
        steps = args.chunk * args.chunks
        data = rng.standard_normal((args.sessions, steps, args.features)).astype(np.float32)
        latencies: list[float] = []

        async def client(index: int, chunks: int) -> None:
            sequence = data[index]
            session_id = None if mode == "tokens" else sessions.create("bench").id
            token: bytes | None = None
            for start in range(0, min(steps, chunks * args.chunk), args.chunk):
                chunk = sequence[start : start + args.chunk]
                began = time.perf_counter()
                if session_id is None:
                    result = await sessions.stream("bench", chunk, "features", state_token=token)
                    token = result.state_token
                else:
                    await sessions.chunk(session_id, chunk, "features")
                latencies.append(time.perf_counter() - began)
            if session_id is not None:
                sessions.close(session_id)

        # Warm-up: every client streams two chunks (the first from the zero state, the second
        # from a carried one), so that allocator, thread pools and the kernels of the very batch
        # shapes measured below are hot in every mode alike.
        await asyncio.gather(*(client(i, 2) for i in range(args.sessions)))
        latencies.clear()
        # NOTE: a full collection now, in every mode alike: otherwise a gen-2 collection set off
        # by earlier rounds' garbage (60-90 ms with torch loaded) lands in whichever mode's
        # measurement happens to be running, and moves that mode's p99 by a whole batch.
        gc.collect()
        began = time.perf_counter()
        await asyncio.gather(*(client(i, args.chunks) for i in range(args.sessions)))
        wall = time.perf_counter() - began
        await engine.drain(1.0)
    ordered = sorted(latencies)
    return {
        "mode": mode,
        "chunks": len(latencies),
        "wall_s": round(wall, 3),
        "chunks_per_s": round(len(latencies) / wall, 1),
        "steps_per_s": round(len(latencies) * args.chunk / wall, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
    }


def kernel_ratios(args: argparse.Namespace) -> dict[str, float]:
    """The model call alone on one chunk's shape: a row alone vs a row inside batches of half and
    all the sessions (the compute-bound ceiling of the batched/unbatched ratio)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(model_config(args, args.sessions)).eval().to(device)

    def per_row_s(rows: int) -> float:
        x = torch.randn(rows, args.chunk, args.features, device=device)
        lengths = torch.full((rows,), args.chunk, dtype=torch.int64)
        state: Any = torch.zeros(args.layers, rows, args.hidden, device=device)
        if args.cell == "lstm":
            state = (state, state.clone())
        times = []
        with torch.inference_mode():
            for _ in range(12):
                start = time.perf_counter()
                model(x, lengths, "none", state).encodings.cpu()
                times.append(time.perf_counter() - start)
        return statistics.median(times[2:]) / rows

    # NOTE: the batches first. A lone call's own cost depends on glibc's mmap threshold, which
    # rises once large blocks are freed (oneDNN's per-call buffers are mapped and unmapped at
    # each call until then: 0.66 vs 1.4 ms here); in a serving process it has risen long ago.
    batched = {n: per_row_s(n) for n in (args.sessions // 2, args.sessions)}
    alone = per_row_s(1)
    return {f"row_alone_over_row_in_{n}": round(alone / cost, 2) for n, cost in batched.items()}


async def main_async(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[float]]:
    """Run `--repeats` rounds of every mode (interleaved, so that a noisy neighbour hits every
    mode alike); keep each mode's median-throughput run and every round's batched/unbatched
    throughput ratio."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    ratios: list[float] = []
    for _ in range(args.repeats):
        round_ = {mode: await run_mode(mode, args) for mode in args.modes}
        for mode, result in round_.items():
            runs[mode].append(result)
        if "batched" in round_ and "unbatched" in round_:
            ratios.append(round_["batched"]["chunks_per_s"] / round_["unbatched"]["chunks_per_s"])
    medians = []
    for results in runs.values():
        results.sort(key=lambda r: r["chunks_per_s"])
        medians.append(results[len(results) // 2])
    return medians, ratios


def main() -> None:
    """Parse flags, run, print a JSON line per mode and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=10, help="time steps per chunk")
    parser.add_argument("--chunks", type=int, default=10, help="chunks per session")
    parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="lstm")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["batched", "unbatched", "tokens"],
        choices=["batched", "unbatched", "tokens"],
    )
    args = parser.parse_args()
    # NOTE: the loop `rnnserve serve` runs (service/process/serve.py): uvloop where installed.
    try:
        import uvloop
    except ImportError:
        results, ratios = asyncio.run(main_async(args))
    else:
        results, ratios = uvloop.run(main_async(args))
    for result in results:
        print(json.dumps(result))
    if ratios:
        summary = {
            "batched_over_unbatched_throughput_median": round(statistics.median(ratios), 2),
            "per_round": [round(r, 2) for r in ratios],
        }
        print(json.dumps(summary))
    # NOTE: the engine's thread count (Settings' default: cores − 1) on this thread too.
    threads = Settings(repository=Path("."), cpu_threads=args.threads).intra_op_threads(
        os.cpu_count() or 1
    )
    torch.set_num_threads(threads)
    print(json.dumps({"model_call_alone": kernel_ratios(args), "threads": threads}))


if __name__ == "__main__":
    main()
