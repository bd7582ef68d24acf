"""Structured logs: one line per lifecycle event, as text or JSON lines; never request payloads.

`configure(format, level)` installs one handler on the root logger (uvicorn's and grpc's loggers
propagate to it). `event(logger, name, **fields)` logs a lifecycle event: in JSON its fields are
top-level keys, in text they follow as `key=value`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

_FIELDS = "rnnserve_fields"
_EVENT = "rnnserve_event"
# Attributes every LogRecord has; anything else was passed in `extra`.
# uvicorn adds `color_message` (an ANSI-coloured copy of the message): dropped.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def _iso(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, _FIELDS, {}))
    for key, value in record.__dict__.items():
        if key not in _STANDARD and key not in (_FIELDS, _EVENT) and not key.startswith("_"):
            fields.setdefault(key, value)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, message, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, _EVENT, None)
        if event is not None:
            line["event"] = event
        line["message"] = record.getMessage()
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> <logger>: <message> key=value …`."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_iso(record.created), record.levelname, f"{record.name}:", record.getMessage()]
        parts += [f"{key}={_text(value)}" for key, value in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


def configure(log_format: Literal["text", "json"] = "text", level: str = "INFO") -> None:
    """Route every logger through one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # NOTE: uvicorn configures its own loggers (handlers, levels); ours is the one format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
        logger.propagate = True


def event(
    logger: logging.Logger, name: str, message: str = "", level: int = logging.INFO, **fields: Any
) -> None:
    """Log one lifecycle event `name` (e.g. "server.ready") with structured `fields`."""
    logger.log(level, message or name, extra={_EVENT: name, _FIELDS: fields})
