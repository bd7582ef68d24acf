"""Typed requests and results of the serving core.

Front-ends translate their wire formats to and from these; protobuf and HTTP types never reach
the core. Arrays are numpy (cheap to build from JSON or raw bytes, cheap to turn into tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

InputKind = Literal["features", "tokens", "text"]
Protocol = Literal["rest", "grpc", "v2-rest", "v2-grpc", "internal"]

# One sequence: float32 [T, F] (features), int64 [T] (tokens), or str (text).
Sequence = np.ndarray | str


@dataclass(frozen=True, slots=True)
class AnswerLimit:
    """The largest answer a wire sends, checked before compute from the answer's shape."""

    max_bytes: int
    # The encoded size counted per number (16 in JSON, 4 in binary tensors and protobuf).
    bytes_per_value: int
    # Per-step encodings padded to the longest sequence (V2's [batch, time, size] tensor).
    padded: bool
    # The setting named in the refusal.
    setting: str


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    """Encode a batch of sequences of one model version."""

    model: str
    sequences: list[Sequence]
    kind: InputKind
    version: int | None = None
    pooling: Literal["last", "mean", "max", "none"] | None = None
    timeout_s: float | None = None
    protocol: Protocol = "internal"
    endpoint: str = "encode"
    answer_limit: AnswerLimit | None = None


@dataclass(frozen=True, slots=True)
class EncodeResult:
    model: str
    version: int
    # float32 [N, E] for pooled encodings; for pooling "none", a list of [T_i, E] arrays.
    encodings: np.ndarray | list[np.ndarray]
    # [N, head.size]: softmax probabilities when the head has labels, raw outputs otherwise.
    scores: np.ndarray | None = None
    # The arg-max label per sequence, when the head has labels.
    labels: list[str] | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Generate an output sequence for each input sequence of a seq2seq model."""

    model: str
    sequences: list[Sequence]
    kind: InputKind
    version: int | None = None
    max_length: int | None = None
    beam_size: int = 1
    timeout_s: float | None = None
    protocol: Protocol = "internal"
    endpoint: str = "generate"


@dataclass(frozen=True, slots=True)
class GeneratedSequence:
    tokens: list[int]
    text: str | None = None


@dataclass(frozen=True, slots=True)
class GenerateResult:
    model: str
    version: int
    outputs: list[GeneratedSequence]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One token of sequence `index` of a streamed generation (greedy decoding streams per step)."""

    index: int
    token: int
    text: str | None = None


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    state: Literal["LOADING", "READY", "FAILED", "UNLOADING", "UNAVAILABLE"]
    reason: str | None = None
    load_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a client may know about a model: versions, states and architecture."""

    name: str
    versions: list[VersionInfo]
    # Architecture of the newest READY version (else newest known): task, input type, cell, layers,
    # directions, hidden size, pooling, head labels, decoder and attention, serving limits.
    architecture: dict[str, Any] = field(default_factory=dict)
