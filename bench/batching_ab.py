"""A/B of server settings under wrk: the encode batcher's regrouping and torch intra-op threads.

Several `rnnserve serve` processes (one per variant) run side by side on loopback, each on the
reference checkpoint of `bench.http` (2-layer LSTM, input 32, hidden 256); only the one being
measured gets traffic, so the others cost nothing. Rounds alternate the variants row by row, and
direct batch-64 model calls are measured before each round, so that every comparison pairs figures
of the same (shared, noisy) minutes. Reported per variant and load: median req/s, its ratio to the
median direct rate, p50/p99, mean batch (server's `rnnserve_batch_size`), errors.

    .venv/bin/python -m bench.batching_ab [--rounds 3] [--duration 5]

Variants: `regroup` (the default settings, `--cpu-threads 1`), `no-regroup`
(`--regroup-fraction 0`: the batch starts as soon as the device is idle), `regroup-2-threads`
(`--cpu-threads 2`), `regroup-narrow` (`--regroup-fraction 0.5 --regroup-max-ms 50`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.http import (
    LUA,
    MODEL,
    batch_totals,
    direct_rate,
    free_port,
    start,
    stop,
    workload,
    write_bodies,
    write_reference_model,
    wrk,
)

VARIANTS = {
    "regroup": ["--cpu-threads", "1"],
    "no-regroup": ["--cpu-threads", "1", "--regroup-fraction", "0"],
    "regroup-2-threads": ["--cpu-threads", "2"],
    "regroup-narrow": ["--cpu-threads", "1", "--regroup-fraction", "0.5", "--regroup-max-ms", "50"],
}
# (workload, protocol, clients)
LOADS = [
    ("varied", "json", 64),
    ("varied", "binary", 64),
    ("fixed", "json", 64),
    ("varied", "json", 16),
    ("varied", "json", 1),
]
PATHS = {"json": f"/v1/models/{MODEL}/encode", "binary": f"/v2/models/{MODEL}/infer"}


def main() -> None:
    """Start one server per variant, alternate the measurements, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma separated")
    args = parser.parse_args()
    variants = args.variants.split(",")
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = write_reference_model(root / "repository")
        script = root / "post.lua"
        script.write_text(LUA)
        sets = {kind: workload(kind, 128, seed=i) for i, kind in enumerate(("varied", "fixed"))}
        for kind, seqs in sets.items():
            for mode in ("json", "binary"):
                write_bodies(root / f"{kind}-{mode}", seqs, mode)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        servers = {}
        urls = {}
        try:
            for name in variants:
                port = free_port()
                urls[name] = f"http://127.0.0.1:{port}"
                command = [
                    sys.executable, "-m", "service.process.cli", "serve",
                    "--repository", str(root / "repository"), "--http-port", str(port),
                    "--grpc-port", "0", "--device", "cpu", "--log-level", "WARNING",
                    *VARIANTS[name],
                ]  # fmt: skip
                servers[name] = start(command, f"{urls[name]}/readyz", env)
                wrk(urls[name], PATHS["json"], root / "varied-json", script, 16, 2)  # warm-up
            results: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
            direct: dict[str, list[float]] = {kind: [] for kind in sets}
            for r in range(args.rounds):
                for kind, seqs in sets.items():
                    direct[kind].append(direct_rate(path, seqs, 3))
                for kind, mode, clients in LOADS:
                    order = variants if r % 2 == 0 else variants[::-1]
                    for name in order:
                        before = batch_totals(urls[name])
                        out = wrk(
                            urls[name], PATHS[mode], root / f"{kind}-{mode}", script, clients,
                            args.duration,
                        )  # fmt: skip
                        after = batch_totals(urls[name])
                        out["batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                        results.setdefault((name, kind, mode, clients), []).append(out)
                print(f"round {r + 1} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for server in servers.values():
                stop(server)
    limits = {kind: statistics.median(rates) for kind, rates in direct.items()}
    print(
        "\ndirect batch-64 seq/s, median (all rounds): "
        + ", ".join(
            f"{k} {v:.0f} ({', '.join(f'{x:.0f}' for x in direct[k])})" for k, v in limits.items()
        )
    )
    print(
        "\n| workload | protocol | clients | variant | req/s (median) | req/s per round | ratio "
        "| p50 ms | p99 ms | mean batch | errors |\n"
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|"
    )
    for kind, mode, clients in LOADS:
        for name in variants:
            runs = results[(name, kind, mode, clients)]
            rate = statistics.median(x["rate"] for x in runs)
            p50 = statistics.median(x["p50_us"] for x in runs) / 1000
            p99 = statistics.median(x["p99_us"] for x in runs) / 1000
            batch = statistics.median(x["batch"] for x in runs)
            errors = sum(x["status_errors"] + x["socket_errors"] for x in runs)
            per_round = " / ".join(f"{x['rate']:.0f}" for x in runs)
            protocol = "JSON" if mode == "json" else "V2 binary"
            print(
                f"| {kind} | {protocol} | {clients} | {name} | {rate:.1f} | {per_round} | "
                f"{rate / limits[kind]:.2f} | {p50:.1f} | {p99:.1f} | {batch:.1f} | {errors} |"
            )


if __name__ == "__main__":
    main()
