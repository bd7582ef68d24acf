"""The host-path benchmark's helpers (bench/overhead.py, bench/stacks.py): the bare ASGI app reads
every body the benchmark sends, and profiles are split into components as documented."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bench import overhead, stacks
from bench.http import workload, write_bodies

ROOT = "thread (1): MainThread;_run_module_as_main (<frozen runpy>:198);run_forever (loop.c:33192)"


@pytest.mark.parametrize("mode", ["json", "v2json", "binary"])
async def test_bare_app_reads_each_body(tmp_path: Path, mode: str) -> None:
    write_bodies(tmp_path / mode, workload("varied", 3, seed=0), mode)
    path = overhead.WIRES["json" if mode == "json" else "v2-json"].target
    transport = httpx.ASGITransport(app=overhead.bare_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://bare") as client:
        for line in (tmp_path / mode / "index.txt").read_text().split("\n")[:-1]:
            name, header_length = line.split()
            headers = {"Inference-Header-Content-Length": header_length} if mode == "binary" else {}
            body = (tmp_path / mode / name).read_bytes()
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == 200
            if mode == "binary":
                length = int(response.headers["inference-header-content-length"])
                head = orjson.loads(response.content[:length])
                size = head["outputs"][0]["parameters"]["binary_data_size"]
                assert len(response.content) == length + size
            elif mode == "v2json":
                assert len(response.json()["outputs"][0]["data"]) == overhead.HIDDEN
            else:
                assert np.array(response.json()["encodings"]).shape == (1, overhead.HIDDEN)


def test_samples_are_split_into_components(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    lines = [
        # idle: the loop waits in epoll
        f"{ROOT};uv__io_poll (linux.c:1);epoll_pwait (libc.so.6) 40",
        # waiting for the GIL on the device thread (a torch op taking it back)
        "thread (2): rnnserve-cpu_0;LSTM.forward (torch/nn/modules/rnn.py:1);"
        "pybind11::gil_scoped_release::~gil_scoped_release (libtorch_python.so);"
        "pthread_cond_timedwait (libc.so.6) 30",
        "thread (2): rnnserve-cpu_0;LSTM.forward (torch/nn/modules/rnn.py:1) 10",
        # the innermost named frame wins: orjson's native frames are transparent
        f"{ROOT};encode (service/rest.py:1);parse_body (service/http_common.py:2);"
        "loads (service/codecs.py:3);0x7f00 (orjson/orjson.so) 20",
        # a collection claims the sample wherever it starts
        f"{ROOT};loads (service/codecs.py:3);gc_collect_main (libpython3.11.so.1.0) 10",
        # the disconnect watcher's own asyncio work, but not the route work it wraps
        f"{ROOT};unless_disconnected (service/http_common.py:1);create_task (loop.c:9) 5",
        f"{ROOT};unless_disconnected (service/http_common.py:1);Engine.encode "
        "(service/engine.py:2) 5",
        # nothing named: not even the loop
        "thread (1): MainThread;_run_module_as_main (<frozen runpy>:198);mystery (x.py:1) 10",
    ]
    raw.write_text("\n".join(lines) + "\n")
    samples = stacks.read(raw)
    counts = stacks.components(samples)
    assert counts["loop"] == {
        stacks.IDLE: 40,
        "JSON parse (orjson)": 20,
        "garbage collector": 10,
        "disconnect watcher (a task per request)": 5,
        "engine (resolve, wait, collect)": 5,
        stacks.OTHER: 10,
    }
    assert counts["device"] == {stacks.GIL: 30, "model (torch)": 10}
    table = stacks.table(samples, {"loop": 100.0, "device": 50.0}, "request")
    # busy loop samples: 50; JSON parse is 20 of them → 40 % of 100 µs
    assert "| JSON parse (orjson) | 40.0 | 40.0 % | 0.0 | 0.0 % |" in table
    assert "| model (torch) | 0.0 | 0.0 % | 50.0 | 100.0 % |" in table
    assert "| waiting for the GIL | – | 0.0 % of samples | – | 75.0 % of samples |" in table
    # side by side: the same samples at twice the CPU time differ by their component's share
    both = stacks.compare({"a": (samples, 200.0), "b": (samples, 100.0)}, "loop", "req")
    assert "| JSON parse (orjson) | 80.0 | 40.0 | +40.0 |" in both
    assert "| CPU time (measured) | **200.0** | **100.0** | **+100.0** |" in both


def test_thread_cpu_reads_every_thread_of_a_process() -> None:
    before = overhead.thread_cpu(os.getpid())
    sum(i * i for i in range(200_000))
    after = overhead.thread_cpu(os.getpid())
    assert os.getpid() in after
    groups = overhead.cpu_by_group(before, after, {os.getpid(): "loop"})
    assert groups["loop"] >= 0.0 and set(groups) == {"loop", "device", "other"}
