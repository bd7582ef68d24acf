"""Structured lifecycle logs: JSON lines with the event's fields as keys, or key=value text."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from service.process import logging_setup


@pytest.fixture
def restore_root() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_event_fields(
    restore_root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logging_setup.configure("json", "INFO")
    logger = logging.getLogger("rnnserve.test")
    logging_setup.event(logger, "server.ready", http_port=8000, models=[{"name": "m"}])
    logger.debug("hidden below INFO")
    logging.getLogger("uvicorn.error").info("Started", extra={"color_message": "\x1b[36m"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    # NOTE: only our loggers: leftovers of other tests may log through the root handler too.
    ready, uvicorn = [x for x in lines if x["logger"] in ("rnnserve.test", "uvicorn.error")]
    assert ready["event"] == "server.ready" and ready["level"] == "INFO"
    assert ready["http_port"] == 8000 and ready["models"] == [{"name": "m"}]
    assert ready["ts"].endswith("Z") and ready["logger"] == "rnnserve.test"
    assert uvicorn["message"] == "Started" and "color_message" not in uvicorn


def test_text_lines_are_key_value(
    restore_root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logging_setup.configure("text", "INFO")
    logging_setup.event(
        logging.getLogger("rnnserve"), "server.draining", signal="SIGTERM", note="a b"
    )
    (line,) = [x for x in capsys.readouterr().err.splitlines() if " rnnserve: " in x]
    assert "INFO rnnserve: server.draining" in line
    assert "signal=SIGTERM" in line and 'note="a b"' in line
