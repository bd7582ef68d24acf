"""Fair sharing of the device and the decode batch, on the demo repository.

While one `dates` generate request of 64 texts of ~2,040 characters with beam_size 16 runs (or
is refused), how long do a 1-text `dates` generate and an `elnino` encode take? Target: each
under 1 s. Each kind of probe runs on its own connection, one at a time, for as long as the big
request runs; their latencies alone (before it) are the reference.

    .venv/bin/python -m bench.fairness [--texts 64] [--chars 2040] [--beam 16] [--alone 10]
        [--threads N] [--flags "--max-request-decode-slots 64"]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import httpx

from bench.server import ROOT, start_server

DATES = ["25 December 2021", "8 de junio de 2004", "Montag, 2. Oktober 2023", "3/4/1999"]
MONTHS = [
    [22.7], [24.4], [25.5], [25.5], [25.8], [24.9], [24.1], [23.1], [22.0], [21.5], [21.6], [22.0],
    [23.2], [24.7], [26.2], [26.5], [26.0], [24.8], [23.3], [21.1], [19.5], [19.3], [19.7], [20.4],
]  # fmt: skip


def big_body(texts: int, chars: int, beam: int) -> dict[str, object]:
    rng = random.Random(0)
    out = []
    for _ in range(texts):
        text = ""
        while len(text) < chars:
            text += rng.choice(DATES) + " "
        out.append(text[:chars])
    return {"texts": out, "beam_size": beam}


def probe(client: httpx.Client, kind: str) -> tuple[float, int]:
    start = time.perf_counter()
    if kind == "dates":
        r = client.post("/v1/models/dates/generate", json={"texts": [random.choice(DATES)]})
    else:
        r = client.post("/v1/models/elnino/encode", json={"inputs": [MONTHS]})
    return time.perf_counter() - start, r.status_code


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    over = sum(v >= 1.0 for v in values)
    return (
        f"n={len(values)} median {statistics.median(values) * 1000:.0f} ms, "
        f"p90 {p90 * 1000:.0f} ms, max {max(values) * 1000:.0f} ms, ≥ 1 s: {over}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--chars", type=int, default=2040)
    parser.add_argument("--beam", type=int, default=16)
    parser.add_argument("--alone", type=int, default=10, help="probes of each kind, alone")
    parser.add_argument("--threads", type=int, default=None, help="--cpu-threads of the server")
    parser.add_argument("--flags", default="", help="more `rnnserve serve` flags")
    args = parser.parse_args()
    flags = args.flags.split()
    if args.threads is not None:
        flags += ["--cpu-threads", str(args.threads)]
    server = start_server(ROOT / "demo-repository", *flags)
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            alone: dict[str, list[float]] = {"dates": [], "elnino": []}
            for _ in range(args.alone):
                for kind in alone:
                    alone[kind].append(probe(client, kind)[0])
            body = big_body(args.texts, args.chars, args.beam)
            outcome: dict[str, object] = {}

            def send_big() -> None:
                start = time.perf_counter()
                with httpx.Client(base_url=server.url, timeout=600) as own:
                    r = own.post("/v1/models/dates/generate", json=body)
                outcome.update(status=r.status_code, seconds=time.perf_counter() - start)
                if r.status_code != 200:
                    outcome["answer"] = r.text[:300]

            big = threading.Thread(target=send_big)
            started = time.perf_counter()
            big.start()
            time.sleep(0.5)  # the big request is parsed, admitted and encoding
            during: dict[str, list[float]] = {"dates": [], "elnino": []}
            failures: list[tuple[str, int]] = []
            slow: list[tuple[str, float, float]] = []  # (kind, sent at s, took s)

            def probes(kind: str) -> None:
                # NOTE: each kind on its own connection and thread, one at a time; a probe sent
                # while the big request runs counts, however long it then waits.
                with httpx.Client(base_url=server.url, timeout=600) as own:
                    while big.is_alive():
                        at = time.perf_counter() - started
                        seconds, status = probe(own, kind)
                        if status != 200:
                            failures.append((kind, status))
                        during[kind].append(seconds)
                        if seconds >= 1.0:
                            slow.append((kind, round(at, 2), round(seconds, 2)))
                        time.sleep(0.1)

            probers = [threading.Thread(target=probes, args=(kind,)) for kind in during]
            for prober in probers:
                prober.start()
            for prober in probers:
                prober.join()
            big.join()
    finally:
        code = server.stop()
    print(f"big request ({args.texts} texts × {args.chars} chars, beam {args.beam}): {outcome}")
    for kind in ("dates", "elnino"):
        print(f"{kind:7s} alone:  {summary(alone[kind])}")
        print(f"{kind:7s} during: {summary(during[kind])}")
    print(f"probes ≥ 1 s (kind, sent at s, took s): {slow or 'none'}")
    print(f"probe failures: {failures or 'none'}; server exit {code}")


if __name__ == "__main__":
    main()
