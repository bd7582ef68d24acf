"""The bounds of a request and of its answer, decided once for every wire: its deadline (its own
`timeout_ms` and the call's deadline) and the size of the answer it asks for.

What needs a wire's encoding to count (JSON values, protobuf fields) is counted by that
front-end (service/http_api/json_codecs.py, service/grpc_api/message_limits.py).
"""

from __future__ import annotations

import math

import numpy as np

from models.config import ModelConfig
from service.core.errors import InvalidInput
from service.core.settings import Settings
from service.core.types import AnswerLimit, InputKind
from service.core.validation import FIELD_OF_KIND

# The longest deadline a request may ask for (every wire's timeout_ms): one hour.
MAX_TIMEOUT_MS = 3_600_000
# What an answer's number is counted at: JSON text (a float32 written out), raw little-endian.
JSON_BYTES_PER_NUMBER = 16
BINARY_BYTES_PER_NUMBER = 4


def timeout_seconds(
    timeout_ms: float | None, deadline_s: float | None = None, field: str = "timeout_ms"
) -> float | None:
    """A request's deadline in seconds: the tighter of its own `timeout_ms` (None: unset; else
    in (0, MAX_TIMEOUT_MS], or `InvalidInput(field)`) and the call's remaining `deadline_s`."""
    if timeout_ms is None:
        return deadline_s
    if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidInput(
            field, f"must be greater than 0 and at most {MAX_TIMEOUT_MS} ms, got {timeout_ms:.15g}"
        )
    own = timeout_ms / 1000
    return own if deadline_s is None else min(own, deadline_s)


def check_timeout(timeout_s: float | None) -> None:
    """A deadline the engine is handed is positive and finite."""
    if timeout_s is not None and not (0 < timeout_s < math.inf):
        raise InvalidInput("timeout_ms", f"must be a positive number, got {timeout_s * 1000:g}")


def answer_limit(
    settings: Settings,
    bytes_per_number: int,
    *,
    padded: bool,
    message_limit: tuple[int, str] | None = None,
) -> AnswerLimit:
    """The largest encode answer a wire sends: `max_answer_bytes`, or the wire's own message
    limit (bytes, the setting that sets it) when that is lower."""
    if message_limit is not None and message_limit[0] < settings.max_answer_bytes:
        return AnswerLimit(message_limit[0], bytes_per_number, padded, message_limit[1])
    return AnswerLimit(settings.max_answer_bytes, bytes_per_number, padded, "--max-answer-bytes")


def check_answer_size(
    config: ModelConfig,
    kind: InputKind,
    arrays: list[np.ndarray],
    pooling: str,
    limit: AnswerLimit,
) -> None:
    """`InvalidInput` when the answer to encoding `arrays` would pass `limit`: per-step encodings
    ("none") grow with every step, so a small request can ask for a huge answer."""
    rows = len(arrays)
    if pooling != "none":
        steps = rows
    elif limit.padded:
        steps = rows * max(a.shape[0] for a in arrays)
    else:
        steps = sum(a.shape[0] for a in arrays)
    values = steps * config.encoding_size + rows * (config.head.size if config.head else 0)
    size = values * limit.bytes_per_value
    if size <= limit.max_bytes:
        return
    advice = "send fewer or shorter sequences"
    if pooling == "none":
        advice += ", or ask for a pooled encoding (pooling 'none' answers every step)"
    raise InvalidInput(
        FIELD_OF_KIND[kind],
        f"the answer would take about {size:,} bytes ({values:,} numbers); the limit is "
        f"{limit.max_bytes:,} bytes ({limit.setting}): {advice}",
    )
