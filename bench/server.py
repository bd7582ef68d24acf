"""A real `rnnserve serve` subprocess for benchmarks: started on free ports, its ports read from
the JSON startup summary, its log kept (and its stderr always drained), stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    process: subprocess.Popen[str]
    http_port: int = 0
    grpc_port: int = 0
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then wait; the exit status (SIGKILL after `timeout_s`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(repository: Path, *flags: str) -> Server:
    """`rnnserve serve --repository REPOSITORY` on free ports (CPU), `flags` added last."""
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
            "--device",
            "cpu",
            "--log-format",
            "json",
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(process)
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = {"raw": raw.rstrip()}
            server.lines.append(line)
            if line.get("event") == "server.ready":
                server.http_port, server.grpc_port = line["http_port"], line["grpc_port"]
                ready.set()
        ready.set()

    # NOTE: keeps reading after startup so that the server never blocks on a full pipe.
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180) or not server.http_port:
        process.kill()
        raise SystemExit(f"the server did not become ready: {server.lines[-20:]}")
    return server
