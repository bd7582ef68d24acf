"""Small measurements behind design choices (bench/RESULTS.md, 2026-11-26 sections).

    .venv/bin/python -m bench.probes gil          # batch compute beside a busy Python thread
    .venv/bin/python -m bench.probes segments     # packed vs segmented RNN paths, by shape
    .venv/bin/python -m bench.probes call-costs   # the segment planner's cost model, fitted
    .venv/bin/python -m bench.probes segments --dtype bfloat16     # the same in bfloat16
    .venv/bin/python -m bench.probes call-costs --dtype bfloat16
    .venv/bin/python -m bench.probes plan-sweep   # bfloat16 planner costs: call × replay sweep
    .venv/bin/python -m bench.probes batch-sizes  # per-sequence cost by batch size (LSTM 2×256)
    .venv/bin/python -m bench.probes hot-routes   # HTTP capacity, direct dispatch on / off
    .venv/bin/python -m bench.probes fixed-ceiling  # the served fixed-length ratio's upper bound
    .venv/bin/python -m bench.probes parse-costs  # parsing 64 MiB bodies / messages, and counting

One intra-op thread throughout (the server's default on 2 cores); medians of repeated runs.
segments and call-costs time the thread's CPU time (`time.thread_time`), which a host shared
with other work does not inflate; the others wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from models.recurrent import make_rnn, run_rnn, run_rnn_outputs, run_segmented


def _median_s(
    work: Callable[[], object], repeats: int = 15, clock: Callable[[], float] = time.perf_counter
) -> float:
    times = []
    with torch.inference_mode():
        work()
        for _ in range(repeats):
            start = clock()
            work()
            times.append(clock() - start)
    return statistics.median(times)


def gil() -> None:
    """The device-thread stage of the encode batch compute of 128 streamed chunks (LSTM 32→256
    ×2, 10 steps, states in and out) on a worker thread: alone, then beside a thread running
    Python, per switch interval."""
    from bench.baseline import reference_config
    from models.checkpoint import build_model
    from service.core.encode_batcher import EncodeCompute, Item

    model = build_model(reference_config()).eval()
    compute = EncodeCompute(model, torch.device("cpu"), torch.float32, (2, 256))
    loop = asyncio.new_event_loop()
    rng = np.random.default_rng(0)

    def state() -> tuple[np.ndarray, ...]:
        return tuple(rng.standard_normal((2, 256)).astype(np.float32) for _ in range(2))

    items = [
        Item(
            rng.standard_normal((10, 32)).astype(np.float32),
            loop.create_future(),
            "none",
            None,
            state(),
            True,
        )
        for _ in range(128)
    ]
    prepared = compute.prepare(items)  # on the event loop in the server

    def on_worker() -> float:
        torch.set_num_threads(1)
        return _median_s(lambda: compute.run(prepared))

    with ThreadPoolExecutor(1) as pool:
        print(f"alone on a worker thread: {pool.submit(on_worker).result() * 1000:.1f} ms")
        for interval_us in (5000.0, 50.0, 15.0, 5.0):
            sys.setswitchinterval(interval_us / 1e6)
            stop = threading.Event()

            def spin(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    {i: [i] for i in range(100)}

            spinner = threading.Thread(target=spin)
            spinner.start()
            try:
                seconds = pool.submit(on_worker).result()
            finally:
                stop.set()
                spinner.join()
            print(
                f"beside a Python thread, switch interval {interval_us:g} µs: "
                f"{seconds * 1000:.1f} ms"
            )


def segments(dtype: torch.dtype) -> None:
    """Packed vs the segmented path, with final states and outputs alone, per cell, size, rows N
    and lengths (uniform in [lo, hi], sorted as the batcher sends them); > 1: segmented faster."""
    generator = torch.Generator().manual_seed(0)
    for cell, hidden, features in (("lstm", 256, 32), ("lstm", 128, 32), ("lstm", 64, 16)):
        rnn = make_rnn(cell, features, hidden, 2).eval().to(dtype)
        assert isinstance(rnn, torch.nn.RNNBase)
        for low, high, rows in (
            (8, 16, 32),
            (16, 32, 32),
            (16, 63, 32),
            (16, 128, 32),
            (32, 63, 8),
        ):
            batches = []
            for _ in range(max(2, 256 // rows)):
                lengths = torch.randint(low, high + 1, (rows,), generator=generator)
                lengths = lengths.sort(descending=True).values
                x = torch.randn(rows, int(lengths.max()), features, generator=generator)
                batches.append((x.to(dtype), lengths))
            state, alone = _segmented_speedups(rnn, batches)
            print(
                f"{cell} hidden {hidden}, lengths {low}-{high}, N={rows}: "
                f"with states {state:.2f}×, outputs alone {alone:.2f}×"
            )


def _segmented_speedups(
    rnn: torch.nn.RNNBase, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
    """Packed time over segmented time, with final states and for outputs alone."""
    cpu = time.thread_time
    packed = _median_s(lambda: [rnn(pack_padded_sequence(x, n, True)) for x, n in batches], 5, cpu)
    state = _median_s(lambda: [run_segmented(rnn, x, n) for x, n in batches], 5, cpu)
    alone = _median_s(lambda: [run_rnn_outputs(rnn, x, n) for x, n in batches], 5, cpu)
    return packed / state, packed / alone


def call_costs(dtype: torch.dtype) -> None:
    """One plain call of the reference LSTM by rows n and steps s, fitted as C + s·(c + n·r):
    the cost model of `models.recurrent.plan_segments`, in row-steps (C/r, c/r)."""
    rnn = make_rnn("lstm", 32, 256, 2).eval().to(dtype)
    generator = torch.Generator().manual_seed(0)
    shapes = [(n, s) for n in (4, 8, 16, 32, 64) for s in (4, 8, 16, 32, 64)]
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    for _ in range(3):
        for n, s in shapes:
            x = torch.randn(n, s, 32, generator=generator).to(dtype)
            repeats = 5 if n * s < 1024 else 3
            times[(n, s)].append(_median_s(lambda x=x: rnn(x), repeats, time.thread_time))
    design = np.array([[1.0, s, n * s] for n, s in shapes])
    seconds = np.array([statistics.median(times[shape]) for shape in shapes])
    (fixed, per_step, per_row_step), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    print(
        f"per call {fixed * 1e3:.3f} ms, per step {per_step * 1e6:.1f} µs, "
        f"per row-step {per_row_step * 1e6:.2f} µs: in row-steps, call "
        f"{fixed / per_row_step:.0f}, step {per_step / per_row_step:.2f}"
    )


def plan_sweep() -> None:
    """The bfloat16 planner's call and replay costs: `run_segmented` time (ms, thread CPU time,
    best of 4) over a grid of both, for hidden 64 and 256 (2 layers), rows 4–64, lengths
    16–128; and each pair's geometric mean over the shapes (the constants in
    `models.recurrent.PLAN_COSTS[torch.bfloat16]` won)."""
    from models import recurrent
    from models.recurrent import PlanCosts

    kept = recurrent.PLAN_COSTS[torch.bfloat16]
    pairs = [
        (call, replay) for call in (30.0, 60.0, 120.0, 200.0, 400.0) for replay in (5.5, 12.0, 25.0)
    ]
    totals: dict[tuple[float, float], list[float]] = {pair: [] for pair in pairs}
    try:
        for hidden in (64, 256):
            rnn = make_rnn("lstm", 32, hidden, 2).eval().to(torch.bfloat16)
            assert isinstance(rnn, torch.nn.RNNBase)
            for rows in (4, 8, 16, 32, 64):
                generator = torch.Generator().manual_seed(rows * 7 + hidden)
                batches = []
                for _ in range(3):
                    lengths = torch.randint(16, 129, (rows,), generator=generator)
                    lengths[0] = 128
                    lengths = lengths.sort(descending=True).values
                    x = torch.randn(rows, 128, 32, generator=generator).to(torch.bfloat16)
                    batches.append((x, lengths))
                cells = []
                for call, replay in pairs:
                    recurrent.PLAN_COSTS[torch.bfloat16] = PlanCosts(call, kept.step, replay)
                    seconds = _best_cpu_s(
                        lambda rnn=rnn, batches=batches: [
                            run_segmented(rnn, x, n) for x, n in batches
                        ]
                    )
                    totals[(call, replay)].append(seconds)
                    cells.append(f"{seconds * 1e3:.1f}")
                print(f"hidden {hidden}, rows {rows}: {' '.join(cells)} ms", flush=True)
    finally:
        recurrent.PLAN_COSTS[torch.bfloat16] = kept
    for (call, replay), seconds in totals.items():
        mean = float(np.exp(np.mean(np.log(seconds))))
        print(f"call {call:g}, replay {replay:g}: geometric mean {mean * 1e3:.2f} ms")


def _best_cpu_s(work: Callable[[], object], repeats: int = 4) -> float:
    with torch.inference_mode():
        work()
        best = float("inf")
        for _ in range(repeats):
            start = time.thread_time()
            work()
            best = min(best, time.thread_time() - start)
    return best


def batch_sizes() -> None:
    """Sequences per second of the reference LSTM by batch size, as a ratio of batch 64."""
    rnn = make_rnn("lstm", 32, 256, 2).eval()
    generator = torch.Generator().manual_seed(0)
    for kind in ("fixed 64", "varied 16-128"):
        rates = {}
        for batch in (8, 16, 32, 64, 128):
            batches = []
            for _ in range(256 // batch):
                if kind.startswith("fixed"):
                    lengths = torch.full((batch,), 64)
                else:
                    lengths = torch.randint(16, 129, (batch,), generator=generator)
                x = torch.randn(batch, int(lengths.max()), 32, generator=generator)
                batches.append((x, lengths))

            def work(batches: list[tuple[torch.Tensor, torch.Tensor]] = batches) -> None:
                for x, lengths in batches:
                    run_rnn(rnn, x, lengths)

            rates[batch] = 256 / _median_s(work, repeats=5)
        cells = ", ".join(f"{b}: {r / rates[64]:.2f}" for b, r in rates.items())
        print(f"{kind}: per-sequence throughput vs batch 64 — {cells}")


def fixed_ceiling() -> None:
    """The upper bound of the served/direct ratio for the fixed-length-64 workload: 64 closed-loop
    clients keep the device busy only with two batches of 32 in turn, so the bound is the per-row
    cost of one batch of 64 over that of a batch of 32 (also beside a busy core, as when the HTTP
    side runs); then oneDNN's own split of one call into weight reorders and the RNN."""
    rnn = make_rnn("lstm", 32, 256, 2).eval()
    x64 = torch.randn(64, 64, 32, generator=torch.Generator().manual_seed(0))
    x32 = x64[:32].contiguous()
    costs: dict[str, list[float]] = {"64": [], "32": [], "32 busy": []}
    for _ in range(5):  # alternated rounds: the host drifts by several % within a minute
        costs["64"].append(_median_s(lambda: rnn(x64), repeats=6) / 64)
        costs["32"].append(_median_s(lambda: rnn(x32), repeats=12) / 32)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)
            costs["32 busy"].append(_median_s(lambda: rnn(x32), repeats=12) / 32)
        finally:
            busy.kill()
            busy.wait()
    row = {name: statistics.median(values) for name, values in costs.items()}
    print(
        f"LSTM 32→256 ×2, 64 steps, ms per row: batch 64 {row['64'] * 1e3:.3f}, "
        f"batch 32 {row['32'] * 1e3:.3f}, batch 32 beside a busy core {row['32 busy'] * 1e3:.3f}"
    )
    print(
        f"ceiling of served/direct with batches of 32: {row['64'] / row['32']:.3f} "
        f"(beside a busy core: {row['64'] / row['32 busy']:.3f})"
    )
    for batch in (32, 64):
        reorders, rnn_ms = _onednn_split(batch)
        print(
            f"oneDNN, one call of {batch} rows: "
            f"weight reorders {reorders:.2f} ms, RNN {rnn_ms:.2f} ms"
        )


def _onednn_split(batch: int) -> tuple[float, float]:
    """Milliseconds oneDNN spends in reorders and in RNN primitives during one warm call."""
    code = (
        "import torch, sys\n"
        "torch.set_num_threads(1)\n"
        "rnn = torch.nn.LSTM(32, 256, 2, batch_first=True).eval()\n"
        f"x = torch.randn({batch}, 64, 32)\n"
        "with torch.inference_mode():\n"
        "    rnn(x); rnn(x)\n"
        "    print('MARK', flush=True)\n"
        "    rnn(x)\n"
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    totals = {"reorder": 0.0, "rnn": 0.0}
    for line in out.split("MARK", 1)[1].splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields and fields[5] in totals:
            totals[fields[5]] += float(fields[-1])
    return totals["reorder"], totals["rnn"]


def hot_routes(seconds: float) -> None:
    """Requests/s of `rnnserve serve`'s HTTP app with a model that costs almost nothing (LSTM
    8→8), fixed-length JSON bodies, wrk at 64 connections: inference routes through the direct
    dispatcher, and through FastAPI's full stack."""
    from bench.http import LUA, free_port, start, stop, workload, write_bodies, wrk
    from models.checkpoint import build_model, save
    from models.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = ModelConfig.model_validate(
            {
                "format": "rnnserve/v1",
                "task": "encode",
                "input": {"type": "features", "size": 32},
                "encoder": {"cell": "lstm", "hidden_size": 8, "num_layers": 1},
                "serving": {"max_batch_size": 64, "max_queue_size": 4096},
            }
        )
        save(build_model(config), root / "repository" / "tiny" / "1")
        (root / "post.lua").write_text(LUA)
        write_bodies(root / "bodies", workload("fixed", 128, seed=1), "json")
        for hot in (True, False):
            port = free_port()
            command = [sys.executable, "-m", "bench.probes", "_serve", str(root / "repository")]
            command += [str(port), "hot" if hot else "plain"]
            server = start(command, f"http://127.0.0.1:{port}/readyz", dict(os.environ))
            try:
                url = f"http://127.0.0.1:{port}"
                path = "/v1/models/tiny/encode"
                wrk(url, path, root / "bodies", root / "post.lua", 16, 2)  # warm-up
                result = wrk(url, path, root / "bodies", root / "post.lua", 64, seconds)
            finally:
                stop(server)
            label = "direct dispatch" if hot else "FastAPI stack"
            print(f"{label}: {result['rate']:.0f} req/s, p50 {result['p50_us'] / 1000:.1f} ms")


PARSE_CASES = ("json-rows", "json-floats", "json-strings", "pb-int64", "pb-strings", "pb-messages")
MIB = 1024 * 1024


def parse_costs(scale: float) -> None:
    """Near the 64 MiB body and message limits: what parsing each shape costs (seconds, peak RSS
    growth; one fresh process each), orjson with the garbage collector running and paused, and
    what the pre-parse count of service/http_api/json_codecs.py or
    service/grpc_api/message_limits.py costs instead."""
    print(f"| shape ({64 * scale:g} MiB) | step | seconds | peak RSS growth MB |")
    print("|---|---|---:|---:|")
    for case in PARSE_CASES:
        steps = ("count", "parse") if case.startswith("pb-") else ("count", "paused", "parse")
        for step in steps:
            command = [sys.executable, "-m", "bench.probes", "_parse", case, step, str(scale)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            seconds, peak = out.split()
            name = {"paused": "parse, collector paused", "count": "count (pre-check)"}
            print(f"| {case} | {name.get(step, step)} | {float(seconds):.2f} | {peak} |")


def _peak_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def _parse_one(case: str, step: str, scale: float) -> None:
    """One measurement of `parse_costs`, in this (fresh) process."""
    import gc

    import orjson

    from rnnserve_client.proto.inference import grpc_service_pb2 as v2
    from service.grpc_api.message_limits import _count
    from service.http_api import json_codecs as codecs

    size = int(64 * MIB * scale)
    payload: bytes
    if case == "json-rows":
        payload = b'{"inputs":[[' + b",".join([b"[0]"] * (size // 4)) + b"]]}"
    elif case == "json-floats":
        payload = b'{"inputs":[[[' + b",".join([b"0.1"] * (size // 4)) + b"]]]}"
    elif case == "json-strings":
        payload = b'{"texts":[' + b",".join([b'"a"'] * (size // 4)) + b"]}"
    else:
        request = v2.ModelInferRequest(model_name="m")
        if case == "pb-int64":
            tensor = request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, size])
            tensor.contents.int64_contents.extend([0] * size)
        elif case == "pb-strings":
            tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[size // 2])
            tensor.contents.bytes_contents.extend([b""] * (size // 2))
        else:
            for _ in range(size // 2):
                request.inputs.add()
        payload = request.SerializeToString()
        del request
    # NOTE: as `rnnserve serve` does once its models are loaded (service/process/serve.py).
    gc.collect()
    gc.freeze()
    Path("/proc/self/clear_refs").write_text("5")
    before = _peak_mb()
    start = time.perf_counter()
    if step == "count" and case.startswith("json"):
        codecs.json_values(payload)
    elif step == "count":
        _count(payload, v2.ModelInferRequest.DESCRIPTOR, 4 * 1024 + 4096)
    elif case.startswith("pb-"):
        v2.ModelInferRequest.FromString(payload)
    elif step == "paused":
        gc.disable()
        orjson.loads(payload)
        gc.enable()
    else:
        orjson.loads(payload)
    print(f"{time.perf_counter() - start:.3f} {_peak_mb() - before}")


def _serve(repository: str, port: int, mode: str) -> None:
    """The server of `hot_routes`: the real app on a real engine, direct dispatch on or off."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from service.core.engine import Engine
    from service.core.metrics import Metrics
    from service.core.settings import Settings
    from service.http_api.app import create_app
    from service.http_api.connection import deadline_protocol

    async def main() -> None:
        settings = Settings(repository=Path(repository), device="cpu", cpu_threads=1)
        sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
        metrics = Metrics(CollectorRegistry())
        engine = Engine(settings, metrics)
        await engine.start()
        app = create_app(engine, settings, metrics, direct_dispatch=mode == "hot")
        # NOTE: the HTTP protocol `rnnserve serve` runs (service/process/serve.py).
        protocol = deadline_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", http=protocol
        )
        await uvicorn.Server(config).serve()

    # NOTE: the loop `rnnserve serve` runs (service/process/serve.py).
    import uvloop

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "probe",
        choices=[
            "gil",
            "segments",
            "call-costs",
            "plan-sweep",
            "batch-sizes",
            "fixed-ceiling",
            "hot-routes",
            "parse-costs",
            "_serve",
            "_parse",
        ],
    )
    parser.add_argument("args", nargs="*")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--scale", type=float, default=1.0, help="parse-costs: size factor")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="segments, call-costs: the recurrent layer's dtype",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe == "gil":
        gil()
    elif args.probe == "segments":
        segments(getattr(torch, args.dtype))
    elif args.probe == "call-costs":
        call_costs(getattr(torch, args.dtype))
    elif args.probe == "plan-sweep":
        plan_sweep()
    elif args.probe == "batch-sizes":
        batch_sizes()
    elif args.probe == "fixed-ceiling":
        fixed_ceiling()
    elif args.probe == "hot-routes":
        hot_routes(args.duration)
    elif args.probe == "parse-costs":
        parse_costs(args.scale)
    elif args.probe == "_parse":
        _parse_one(args.args[0], args.args[1], float(args.args[2]))
    else:
        _serve(args.args[0], int(args.args[1]), args.args[2])


if __name__ == "__main__":
    main()
