"""Typed requests and results of the serving core, and the vocabulary both front-ends share.

Front-ends translate their wire formats to and from these; protobuf and HTTP types never reach
the core. Arrays are numpy (cheap to build from JSON or raw bytes, cheap to turn into tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from models.config import RequestPooling

InputKind = Literal["features", "tokens", "text"]
# The wire a request came over: the `protocol` label of the request metrics.
Wire = Literal["rest", "grpc", "v2-rest", "v2-grpc"]
# How a request's encodings are pooled over time ("none": every step's output).
Pooling = RequestPooling
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
VersionState = Literal["LOADING", "READY", "FAILED", "UNLOADING"]

# One sequence: float32 [T, F] (features), int64 [T] (tokens), or str (text).
SequenceData = np.ndarray | str
# A row's recurrent state on the host: float32 [L*D, H] per tensor (LSTM: (h, c)).
HostState = tuple[np.ndarray, ...]


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
class SequencesRequest:
    """A batch of sequences for one model (its newest READY version, or `version`), answered
    within `timeout_s` (None: the server's default deadline)."""

    model: str
    sequences: list[SequenceData]
    kind: InputKind
    version: int | None = None
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class EncodeRequest(SequencesRequest):
    """Encode every sequence; `answer_limit` bounds the answer the wire would send."""

    pooling: Pooling | None = None
    answer_limit: AnswerLimit | None = None


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """The encodings of an EncodeRequest, in its order, and the version that computed them."""

    model: str
    version: int
    # float32 [N, E] for pooled encodings; for pooling "none", a list of [T_i, E] arrays.
    encodings: np.ndarray | list[np.ndarray]
    # [N, head.size]: softmax probabilities when the head has labels, raw outputs otherwise.
    scores: np.ndarray | None = None
    # The arg-max label per sequence, when the head has labels.
    labels: list[str] | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest(SequencesRequest):
    """Generate an output sequence for each input sequence of a seq2seq model."""

    max_length: int | None = None
    beam_size: int = 1


@dataclass(frozen=True, slots=True)
class GeneratedSequence:
    """One generated output: token ids (no <bos>/<eos>) and, for text models, their text."""

    tokens: list[int]
    text: str | None = None


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """The outputs of a GenerateRequest, in its order, and the version that decoded them."""

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
class ChunkRequest:
    """One chunk of a streamed sequence, encoded from its row's state so far (None: zeros)."""

    model: str
    version: int
    sequence: SequenceData
    kind: InputKind
    initial_state: HostState | None
    timeout_s: float | None


@dataclass(frozen=True, slots=True)
class ChunkOutput:
    """One streamed chunk as the encode batcher computed it: every step's top-layer output and
    the row's final state."""

    version: int
    outputs: np.ndarray  # float32 [T, E]
    final_state: HostState


@dataclass(frozen=True, slots=True)
class Head:
    """A model's linear head on the host: scores = weight @ encoding + bias."""

    weight: np.ndarray  # float32 [S, E]
    bias: np.ndarray  # float32 [S]
    labels: list[str] | None


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """The public view of one version: its state, why it failed, how long it took to load."""

    version: int
    state: VersionState
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
