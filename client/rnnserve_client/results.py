"""What the calls return: the same objects whichever wire (REST or gRPC) answered."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EncodeResult:
    """The answer to `encode`.

    `encodings`: float32 [sequences, size]; for pooling "none" a list of [time, size] arrays
    (one per sequence, lengths differ). `labels` (arg-max label per sequence) and `scores`
    (float32 [sequences, head size]) when the model has a head, else None.
    """

    model: str
    version: int
    encodings: Floats | list[Floats]
    labels: list[str] | None = None
    scores: Floats | None = None


@dataclass(frozen=True)
class GeneratedOutput:
    """One generated sequence: token ids, and the text for models with a target vocabulary."""

    tokens: list[int]
    text: str | None = None


@dataclass(frozen=True)
class GenerateResult(Sequence[GeneratedOutput]):
    """The answer to `generate`: a sequence of outputs (one per input), with the model version."""

    model: str
    version: int
    outputs: list[GeneratedOutput] = field(default_factory=list)

    @overload
    def __getitem__(self, index: int) -> GeneratedOutput: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[GeneratedOutput]: ...

    def __getitem__(self, index: int | slice) -> GeneratedOutput | Sequence[GeneratedOutput]:
        return self.outputs[index]

    def __len__(self) -> int:
        return len(self.outputs)

    def __iter__(self) -> Iterator[GeneratedOutput]:
        return iter(self.outputs)


@dataclass(frozen=True)
class TokenEvent:
    """One token of `generate_stream`, as soon as it is decoded: input `index`'s next token."""

    index: int
    token: int
    text: str | None = None


@dataclass(frozen=True)
class ChunkResult:
    """The answer to a chunk (`stream`, or a session's `send`).

    `encoding`: float32 [size] over every step so far (or [time, size], this chunk's steps, for
    pooling "none"); `steps`: steps consumed so far; `scores`/`label` with a head;
    `state_token`: pass it to the next `stream` call (any replica sharing the server key).
    """

    model: str
    version: int
    steps: int
    encoding: Floats
    scores: Floats | None = None
    label: str | None = None
    state_token: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """One version of a model on the server: its state, and why it failed if it did."""

    version: int
    state: str
    reason: str | None = None
    load_seconds: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A model: its versions and the architecture of its serving version."""

    name: str
    versions: list[VersionInfo]
    architecture: dict[str, Any]

    @property
    def ready(self) -> bool:
        """Whether some version is READY."""
        return any(v.state == "READY" for v in self.versions)


@dataclass(frozen=True)
class SessionOpened:
    """What the server answers when a session opens (a session's attributes start from it)."""

    session_id: str
    model: str
    version: int
    pooling: str
    steps: int
