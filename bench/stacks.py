"""Where a server's threads spend their time, from py-spy's raw stacks.

`py-spy record --format raw --threads --native` writes one line per distinct stack: the thread
("thread (TID): NAME"), the frames root first ("func (file:line)", native frames "func (lib)"),
and a sample count. Each sample gets one component:
- first, states and mechanisms that claim the whole sample wherever they sit in the stack:
  idle (the thread waits for work: epoll, an empty queue, a lock), waiting for the GIL, the
  garbage collector, wake-ups of another thread (eventfd writes), the disconnect watcher's
  task, the metrics, logging, FastAPI's per-request telemetry check;
- then functions whose own work (asyncio's included) is a component: the disconnect watcher's
  set-up and tear-down;
- otherwise the innermost frame that a rule names: a Python module or function (JSON parse,
  numpy conversion, validation, pydantic, engine, batcher, asyncio, uvicorn, ...) or a native
  library that has no Python caller to name it (socket syscalls, httptools' parser, uvloop, gRPC's
  Cython layer, protobuf). The interpreter's own frames and numpy's, orjson's and torch's
  native frames are transparent: the Python function that called them names the work.

`table` turns the samples into time per unit of work (request, decode step): each busy
component's share of a thread's busy samples times that thread's CPU time per unit (measured
apart, from /proc), so that a host that preempts the server does not inflate the figures.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

IDLE = "idle (waiting for work)"
GIL = "waiting for the GIL"
NOT_CPU = (IDLE, GIL)
OTHER = "other"

# (component, pattern): checked against every frame ("func (file)", line numbers removed); the
# innermost matching frame wins among these...
CLAIMS: list[tuple[str, str]] = [
    ("garbage collector", r"^(gc_collect_main|gc_collect_with_callback|collect_generations) "),
    ("thread wake-ups (eventfd writes)", r"^(eventfd_write|uv_async_send) "),
    ("disconnect watcher (a task per request)", r"^_disconnected "),
    (
        "metrics",
        r"prometheus_client/|service/(core/)?metrics\.py"
        r"|service/(metric_labels|core/request_metrics)\.py",
    ),
    (
        "metrics",
        r"^(RequestObserver\.(record|observe)|CallRecorder\.observe|RequestMetrics\.record"
        r"|Observed\.__(enter|exit)__) ",
    ),
    ("logging", r"\(logging/|service/(process/)?logging_setup\.py"),
    ("FastAPI telemetry check", r"^NativeTelemetry\.enabled |opentelemetry|\(trace/__init__"),
]
# ...or a function's own work, asyncio's and the event loop's included (nothing deeper that
# another rule names)...
OWN: list[tuple[str, str]] = [
    ("disconnect watcher (a task per request)", r"^unless_disconnected "),
]
LIBRARIES = ("asyncio futures/tasks", "event loop (uvloop)")
# ...and only then the innermost frame matching one of these (first rule that matches it).
RULES: list[tuple[str, str]] = [
    ("socket reads/writes (syscalls)", r"^(write|writev|sendmsg|send|recv|recvmsg|read) \(libc"),
    (
        "futex wakes (GIL drops, lock releases)",
        r"^(__lll_lock_wake|lll_mutex_unlock_optimized|__pthread_mutex_unlock_usercnt|futex_wake)",
    ),
    ("HTTP protocol (uvicorn, httptools)", r"\(uvicorn/|\((llhttp|api|parser)\.c\)"),
    (
        "JSON parse (orjson)",
        r"^(loads|split_v2_body) \(service/(http_api/json_)?codecs|^parse_json \(",
    ),
    (
        "response building",
        r"^(json_response|dumps|encode_v2_response|select_outputs|generate_answer|encode_answer"
        r"|infer_answer|fields_of|present|raw_contents) \(service/"
        r"|starlette/responses\.py|^(encode_result_to_proto|float_array|v2_infer_response"
        r"|encode_outputs|_padded|requested_outputs)[ .]",
    ),
    (
        "numpy conversion + input checks",
        r"^(features_from_json|_require_finite|_features_error|decode_v2_inputs|_from_binary"
        r"|_from_json_data|_flatten|tensor_elements|float_values|_feature_sequence|_from_raw"
        r"|_from_contents|check_int_range|_sequences|to_array|_features|_tokens|raw_array"
        r"|bytes_elements|feature_sequence|unpack_bytes)[ .(]",
    ),
    ("protobuf parse/serialise", r"_message\.abi3\.so|^PyUpb|^upb_|^parse_request \(|protobuf/"),
    ("pydantic", r"pydantic|^parse_body \("),
    (
        "validation (task, shapes, parameters)",
        r"service/(core/)?(validation|limits)\.py|^(infer_sequences|_check_batch|_lengths"
        r"|parameter|timeout_s|pooling|generate_options|infer_request|encode_request_from_proto"
        r"|request_timeout|optional_version|v2_infer_request|v2_parameters|plain_parameters"
        r"|pooling_from_proto|_request_of|path_version|request_sequences|deadline_of)[ .(]",
    ),
    ("engine submit (enqueue)", r"^Batcher\.submit "),
    (
        "batcher (form, prepare, deliver rows)",
        r"service/(batching|core/encode_batcher)\.py|\(models/encoder\.py",
    ),
    ("decode scheduler", r"service/(decoding|core/decode_scheduler)\.py"),
    ("model (torch)", r"\((models|torch)/"),
    ("engine (resolve, wait, collect)", r"service/(core/)?(engine|registry)\.py"),
    ("dataclass construction", r"^__create_fn__"),
    (
        "thread hand-offs (executor queue, locks)",
        r"concurrent/futures/|service/(core/)?executor\.py|\(threading\.py"
        r"|^_queue_SimpleQueue_put"
        r"|^(sem_post|pthread_cond_signal|call_soon_threadsafe) ",
    ),
    (
        "ASGI layers (Starlette, FastAPI, middlewares)",
        r"\((starlette|fastapi)/|service/http_(hot|limits)\.py|\(contextlib\.py"
        r"|service/http_api/(direct_dispatch|body_limits|routing)\.py",
    ),
    ("gRPC aio (Cython, core on this thread)", r"\(grpc/|cygrpc"),
    ("asyncio futures/tasks", r"\(asyncio/|_asynciomodule|\(_weakrefset\.py"),
    (
        "route / servicer code",
        r"service/(rest|v2_rest|grpc_api|v2_grpc|http_common|v2_common|grpc_convert)\.py"
        r"|service/http_api/(app|v1_routes|v2_routes|session_routes|bodies|disconnects)\.py"
        r"|service/grpc_api/(server|calls|v1_servicer|v2_servicer|session_servicer|convert)\.py"
        r"|service/inference_protocol/"
        r"|\(typing\.py|\(inspect\.py",
    ),
    ("bare app / bench code", r"\(overhead\.py"),
    ("event loop (uvloop)", r"\((loop|core|linux|stream|async|loop-watcher)\.c\)|uvloop/"),
]
_CLAIMS = [(name, re.compile(pattern)) for name, pattern in CLAIMS]
_OWN = [(name, re.compile(pattern)) for name, pattern in OWN]
_RULES = [(name, re.compile(pattern)) for name, pattern in RULES]
_LINE = re.compile(r":\d+\)$")
_WAITS = re.compile(r"^(pthread_cond_wait|pthread_cond_timedwait|take_gil) ")
_IDLE = re.compile(r"^(epoll_wait|epoll_pwait|_queue_SimpleQueue_get|PyThread_acquire_lock_timed) ")
# A futex wait with neither above it: the interpreter taking the GIL back (its inlined path).
_FUTEX_WAIT = re.compile(r"^(__futex_abstimed_wait_common|__new_sem_wait_slow)")
_ADDRESS = re.compile(r"^0x([0-9a-f]+) \((.+)\)$")

Sample = tuple[str, list[str], int]  # thread name, frames root first (no line numbers), count


def read(path: Path) -> list[Sample]:
    """The samples of a py-spy raw file recorded with `--threads`."""
    samples: list[Sample] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        samples.append((thread, [_LINE.sub(")", f) for f in frames[1:]], int(count)))
    return samples


def symbolize(path: Path, pid: int) -> None:
    """Name the native frames py-spy left as addresses ("0x7f… (libc.so.6)"), with addr2line and
    the live process's memory map (run it while `pid` still runs); rewrites `path`."""
    text = path.read_text()
    wanted: dict[str, set[int]] = {}
    for frame in set(re.findall(r"0x[0-9a-f]+ \([^;()]+\)", text)):
        match = _ADDRESS.match(frame)
        if match:
            wanted.setdefault(match.group(2), set()).add(int(match.group(1), 16))
    bases: dict[str, tuple[int, str]] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        library = parts[5].rsplit("/", 1)[-1]
        if library in wanted and library not in bases:
            bases[library] = (int(parts[0].split("-")[0], 16), parts[5])
    names: dict[str, str] = {}
    for library, addresses in wanted.items():
        if library not in bases:
            continue
        base, file = bases[library]
        ordered = sorted(addresses)
        out = subprocess.run(
            ["addr2line", "-f", "-e", file, *(hex(a - base) for a in ordered)],
            capture_output=True,
            text=True,
        )
        functions = out.stdout.splitlines()[::2]
        for address, function in zip(ordered, functions, strict=False):
            if function and function != "??":
                names[f"0x{address:x} ({library})"] = f"{function} ({library})"
    if names:
        path.write_text(
            re.sub(r"0x[0-9a-f]+ \([^;()]+\)", lambda m: names.get(m.group(0), m.group(0)), text)
        )


def classify(frames: list[str]) -> str:
    """The component of one sample (frames root first)."""
    # NOTE: waits first: the innermost wait-like frame says whether the thread sleeps for work
    # (idle) or for the GIL (it has work and cannot run it).
    futex = False
    for frame in reversed(frames[-8:]):
        if _WAITS.match(frame):
            return GIL
        if _IDLE.match(frame):
            return IDLE
        futex = futex or bool(_FUTEX_WAIT.match(frame))
    if futex:
        return GIL
    for frame in reversed(frames):
        for name, pattern in _CLAIMS:
            if pattern.search(frame):
                return name
    innermost = OTHER
    for depth in range(len(frames) - 1, -1, -1):
        frame = frames[depth]
        for name, pattern in _OWN:
            if pattern.search(frame) and innermost in (OTHER, *LIBRARIES):
                return name
        if innermost == OTHER:
            innermost = _rule(frame)
    return innermost


def _rule(frame: str) -> str:
    for name, pattern in _RULES:
        if pattern.search(frame):
            return name
    return OTHER


def group_of(thread: str) -> str:
    """A thread's group by its Python name: loop, device, prefill or other."""
    if thread == "MainThread":
        return "loop"
    if thread.startswith("rnnserve-prefill"):
        return "prefill"
    if thread.startswith("rnnserve-"):
        return "device"
    return "other"


def components(samples: list[Sample]) -> dict[str, Counter[str]]:
    """Sample counts by thread group and component."""
    out: dict[str, Counter[str]] = {}
    for thread, frames, count in samples:
        out.setdefault(group_of(thread), Counter())[classify(frames)] += count
    return out


def table(samples: list[Sample], cpu_per_unit: dict[str, float], unit: str) -> str:
    """A Markdown table: each component's µs per `unit` on the loop and device threads (its share
    of the thread's busy samples × the thread's CPU µs per unit), and the share of the thread's
    samples spent idle or waiting for the GIL."""
    counts = components(samples)
    groups = [g for g in ("loop", "device") if g in counts]
    busy = {g: sum(n for c, n in counts[g].items() if c not in NOT_CPU) for g in groups}
    total = {g: sum(counts[g].values()) for g in groups}
    ranked = Counter[str]()
    for g in groups:
        for name, n in counts[g].items():
            if name not in NOT_CPU and busy[g]:
                ranked[name] += n / busy[g] * cpu_per_unit.get(g, 0.0)
    head = " | ".join(f"{g} µs/{unit} | {g} share" for g in groups)
    lines = [f"| component | {head} |", "|---|" + "---:|---:|" * len(groups)]

    def cells(name: str) -> str:
        out = []
        for g in groups:
            n = counts[g].get(name, 0)
            share = n / busy[g] if busy[g] else 0.0
            out.append(f"{share * cpu_per_unit.get(g, 0.0):.1f} | {100 * share:.1f} %")
        return " | ".join(out)

    for name, _ in ranked.most_common():
        lines.append(f"| {name} | {cells(name)} |")
    totals = " | ".join(f"**{cpu_per_unit.get(g, 0.0):.1f}** | 100 %" for g in groups)
    lines.append(f"| **CPU time (measured)** | {totals} |")
    for name in NOT_CPU:
        waits = " | ".join(
            f"– | {100 * counts[g].get(name, 0) / max(1, total[g]):.1f} % of samples"
            for g in groups
        )
        lines.append(f"| {name} | {waits} |")
    return "\n".join(lines)


def compare(profiles: dict[str, tuple[list[Sample], float]], group: str, unit: str) -> str:
    """A Markdown table of one thread group's µs per `unit` by component, one column per
    profile (label → (samples, the group's CPU µs per unit)), and the first two's difference."""
    columns: dict[str, Counter[str]] = {}
    for label, (samples, cpu) in profiles.items():
        counts = components(samples).get(group, Counter())
        busy = sum(n for name, n in counts.items() if name not in NOT_CPU)
        columns[label] = Counter(
            {name: n / busy * cpu for name, n in counts.items() if name not in NOT_CPU and busy}
        )
    labels = list(profiles)
    first = columns[labels[0]]
    second = columns[labels[1]] if len(labels) > 1 else Counter[str]()
    names = sorted(set().union(*columns.values()), key=lambda n: (second[n] - first[n], -first[n]))
    diff = f" | {labels[0]} − {labels[1]}" if len(labels) > 1 else ""
    lines = [
        f"| component ({group} thread, µs/{unit}) | " + " | ".join(labels) + diff + " |",
        "|---|" + "---:|" * (len(labels) + (1 if diff else 0)),
    ]
    for name in names:
        cells = " | ".join(f"{columns[label][name]:.1f}" for label in labels)
        extra = f" | {first[name] - second[name]:+.1f}" if diff else ""
        lines.append(f"| {name} | {cells}{extra} |")
    totals = " | ".join(f"**{profiles[label][1]:.1f}**" for label in labels)
    extra = f" | **{profiles[labels[0]][1] - profiles[labels[1]][1]:+.1f}**" if diff else ""
    lines.append(f"| CPU time (measured) | {totals}{extra} |")
    return "\n".join(lines)
