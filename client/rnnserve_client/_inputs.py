"""The request parts a caller gives, checked and normalised once for both wires."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

InputKind = Literal["inputs", "tokens", "texts"]
Pooling = Literal["last", "mean", "max", "none"]


@dataclass(frozen=True)
class Batch:
    """Sequences of one kind: float32 [time, features] arrays, int64 [time] arrays, or texts."""

    kind: InputKind
    items: list[Any]


@dataclass(frozen=True)
class Chunk:
    """One chunk of a stream: float32 [time, features], int64 [time], or a text."""

    kind: Literal["inputs", "tokens", "text"]
    value: Any


@dataclass(frozen=True)
class EncodeArgs:
    """What `encode` asks for."""

    model: str
    batch: Batch
    pooling: str | None
    version: int | None


@dataclass(frozen=True)
class GenerateArgs:
    """What `generate` (and `generate_stream`) asks for."""

    model: str
    batch: Batch
    max_length: int | None
    beam_size: int | None
    version: int | None


@dataclass(frozen=True)
class StreamArgs:
    """What `stream` asks for: one chunk of a stream whose state travels in `state_token`."""

    model: str
    chunk: Chunk
    pooling: str | None
    state_token: str | bytes | None
    version: int | None


@dataclass(frozen=True)
class SessionArgs:
    """What `session` asks for: a server-held session (from `state_token`'s state, if given)."""

    model: str
    pooling: str | None
    return_state: bool
    state_token: str | bytes | None
    version: int | None


def batch_of(inputs: Any = None, tokens: Any = None, texts: Any = None) -> Batch:
    """Exactly one of `inputs` (feature sequences), `tokens` (id sequences), `texts`."""
    given = [
        name
        for name, value in (("inputs", inputs), ("tokens", tokens), ("texts", texts))
        if value is not None
    ]
    if len(given) != 1:
        raise TypeError(f"give exactly one of inputs=, tokens=, texts= (got {given or 'none'})")
    if inputs is not None:
        return Batch("inputs", [_features(item, f"inputs[{i}]") for i, item in _rows(inputs)])
    if tokens is not None:
        return Batch("tokens", [_token_ids(item, f"tokens[{i}]") for i, item in _rows(tokens)])
    if isinstance(texts, str | bytes) or not isinstance(texts, Iterable):
        raise TypeError("texts= is a list of strings, one per sequence")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return Batch("texts", items)


def chunk_of(chunk: Any) -> Chunk:
    """A chunk by its shape: a str is text, [time][features] numbers are features, and a flat
    sequence of integers is token ids."""
    if isinstance(chunk, str):
        return Chunk("text", chunk)
    array = np.asarray(chunk)
    if array.ndim == 2:
        return Chunk("inputs", _features(array, "chunk"))
    if array.ndim == 1 and (array.dtype.kind in "iu" or array.size == 0):
        return Chunk("tokens", _token_ids(array, "chunk"))
    raise TypeError(
        "chunk is a text (str), feature steps ([time][features] numbers) or token ids "
        f"([time] integers); got an array of shape {array.shape} and dtype {array.dtype}"
    )


def _rows(batch: Any) -> Iterable[tuple[int, Any]]:
    if isinstance(batch, str | bytes) or not isinstance(batch, Iterable | np.ndarray):
        raise TypeError("a batch is a list of sequences (or an array with one row per sequence)")
    return enumerate(batch)


def _features(item: Any, where: str) -> npt.NDArray[np.float32]:
    try:
        array = np.asarray(item, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a [time][features] array of numbers ({exc})") from None
    if array.ndim != 2:
        raise ValueError(
            f"{where}: a feature sequence is [time][features], got shape {array.shape}"
        )
    return np.ascontiguousarray(array)


def _token_ids(item: Any, where: str) -> npt.NDArray[np.int64]:
    try:
        array = np.asarray(item)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not a flat list of integers ({exc})") from None
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(
            f"{where}: token ids are a flat list of integers, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


def token_text(token: str | bytes) -> str:
    """A state token as the JSON text (unpadded base64url) the REST API uses."""
    if isinstance(token, bytes):
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")
    return token


def token_bytes(token: str | bytes) -> bytes:
    """A state token as the raw bytes gRPC carries."""
    if isinstance(token, bytes):
        return token
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        # NOTE: sent as is, so that the server's refusal names what is wrong with it.
        return token.encode()
