"""Training progress on stderr: a live bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Reports steps (loss, running metric, ETA) and epoch summaries.

    On a TTY one line is redrawn in place; otherwise a log line is written at most every
    `log_every_s` seconds, so that CI logs stay short.
    """

    def __init__(
        self,
        total_steps: int,
        metric_name: str,
        stream: TextIO | None = None,
        tty: bool | None = None,
        log_every_s: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total = max(1, total_steps)
        self.metric_name = metric_name
        self.log_every_s = log_every_s
        self.started = time.monotonic()
        self._last_log = self.started

    def line(self, step: int, epoch: int, epochs: int, loss: float, metric: float) -> str:
        """The progress text for `step` (1-based) of the whole run."""
        elapsed = time.monotonic() - self.started
        eta = elapsed / step * (self.total - step) if step else 0.0
        done = step / self.total
        text = (
            f"epoch {epoch}/{epochs} step {step}/{self.total} loss {loss:.4f} "
            f"{self.metric_name} {metric:.4f} elapsed {_duration(elapsed)} ETA {_duration(eta)}"
        )
        if self.tty:
            filled = int(done * 24)
            return f"[{'#' * filled}{'.' * (24 - filled)}] {done:4.0%} {text}"
        return text

    def update(self, step: int, epoch: int, epochs: int, loss: float, metric: float) -> None:
        """Report a finished step."""
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(step, epoch, epochs, loss, metric))
            self.stream.flush()
        elif now - self._last_log >= self.log_every_s:
            self._last_log = now
            self.stream.write(self.line(step, epoch, epochs, loss, metric) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Write a whole line (an epoch summary), not overwritten by the bar."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
