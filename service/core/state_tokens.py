"""Portable state tokens: a streaming session's RNN state, sealed so any replica can resume it.

A token is opaque to clients, integrity-protected (HMAC-SHA256 with a server key), versioned
(a format byte) and bound to one model version and its architecture. Layout, little-endian:

    format      u8     = 1
    key_id      8 B    first 8 bytes of HMAC(key, "rnnserve state key id"): tells "other key"
                       apart from "tampered" without revealing the key
    body_len    u32
    body        expires_at u64 (unix s, 0 = never) · version u32 · arch 8 B (sha256 prefix of the
                shape signature) · steps u64 · name_len u8 · name (utf-8) · n_arrays u8 ·
                per array: ndim u8 · dims u32 × ndim · float32 data
    mac         32 B   HMAC-SHA256(key, everything before it)

JSON carries it as unpadded base64url; gRPC carries the raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import math
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.core.errors import InvalidInput

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_ENV = "RNNSERVE_STATE_KEY"
MIN_KEY_BYTES = 16
DEFAULT_MAX_TOKEN_BYTES = 4 * 1024 * 1024

_HEADER = struct.Struct("<B8sI")
_BODY_FIXED = struct.Struct("<QI8sQ")
_MAC_BYTES = 32
_KEY_ID_LABEL = b"rnnserve state key id"
_MAX_ARRAYS = 16
_MAX_NDIM = 4

Reason = Literal[
    "garbled",
    "truncated",
    "unknown_format",
    "wrong_key",
    "tampered",
    "expired",
    "wrong_model",
    "too_large",
]


class StateTokenError(InvalidInput):
    """A state token was refused; `reason` says why in one machine-readable word."""

    def __init__(self, reason: Reason, message: str, field: str = "state_token") -> None:
        super().__init__(field, message)
        self.reason: Reason = reason


@dataclass(frozen=True, slots=True)
class TokenBinding:
    """What a token is valid for: one model version with one architecture."""

    model: str
    version: int
    # A description of every shape the state depends on (cell, layers, sizes...).
    signature: str


@dataclass(frozen=True, slots=True)
class StreamState:
    """The state a token carries: float32 arrays (RNN state, pooling accumulators) + steps seen."""

    arrays: tuple[np.ndarray, ...]
    steps: int


def load_key(value: str | None) -> tuple[bytes, bool]:
    """The HMAC key from `value` (UTF-8, ≥16 bytes), or a random one; returns (key, ephemeral)."""
    if value is None or value == "":
        log.warning(
            "%s is not set: state tokens use a random per-process key, so they do not survive a "
            "restart and are not accepted by other replicas",
            KEY_ENV,
        )
        return secrets.token_bytes(32), True
    key = value.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{KEY_ENV} must be at least {MIN_KEY_BYTES} bytes long, got {len(key)}")
    return key, False


class StateTokenCodec:
    """Seals `StreamState`s into tokens and opens them again, refusing anything not ours."""

    def __init__(
        self,
        key: bytes,
        *,
        max_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"state key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self._key_id = hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:8]
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock

    # --- sealing -------------------------------------------------------------------------------

    def seal(self, binding: TokenBinding, state: StreamState) -> bytes:
        """The raw token bytes of `state`, bound to `binding`."""
        name = binding.model.encode()
        if len(name) > 255:
            raise ValueError("model name longer than 255 bytes")
        if len(state.arrays) > _MAX_ARRAYS:
            raise ValueError(f"at most {_MAX_ARRAYS} arrays per token")
        expires = 0 if self.ttl_s is None else int(self._clock() + self.ttl_s) + 1
        parts = [
            _BODY_FIXED.pack(expires, binding.version, _arch(binding.signature), state.steps),
            bytes([len(name)]),
            name,
            bytes([len(state.arrays)]),
        ]
        for array in state.arrays:
            if array.ndim > _MAX_NDIM:
                raise ValueError(f"at most {_MAX_NDIM} dimensions per array")
            parts.append(struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape))
            parts.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
        body = b"".join(parts)
        signed = _HEADER.pack(FORMAT_VERSION, self._key_id, len(body)) + body
        token = signed + hmac.digest(self._key, signed, "sha256")
        if len(token) > self.max_bytes:
            raise ValueError(f"state token of {len(token)} bytes exceeds {self.max_bytes}")
        return token

    def encode(self, binding: TokenBinding, state: StreamState) -> str:
        """The token as unpadded base64url text (for JSON)."""
        return base64.urlsafe_b64encode(self.seal(binding, state)).rstrip(b"=").decode("ascii")

    # --- opening -------------------------------------------------------------------------------

    def decode(self, token: str, binding: TokenBinding, field: str = "state_token") -> StreamState:
        """Open a base64url token for `binding`; raise `StateTokenError` naming the reason."""
        # NOTE: a size check before decoding, so a huge string costs nothing.
        if len(token) > (self.max_bytes * 4) // 3 + 4:
            raise StateTokenError("too_large", f"longer than {self.max_bytes} bytes", field)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise StateTokenError("garbled", "is not valid base64url", field) from None
        # NOTE: the last base64 character may carry unused bits; a non-canonical spelling would
        # be a second valid text for the same token, so it is refused.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token.rstrip("="):
            raise StateTokenError("garbled", "is not canonical base64url", field)
        return self.open(raw, binding, field)

    def open(self, raw: bytes, binding: TokenBinding, field: str = "state_token") -> StreamState:
        """Open raw token bytes for `binding`; raise `StateTokenError` naming the reason."""
        if len(raw) > self.max_bytes:
            raise StateTokenError("too_large", f"longer than {self.max_bytes} bytes", field)
        if len(raw) == 0:
            raise StateTokenError("truncated", "is empty", field)
        if raw[0] != FORMAT_VERSION:
            raise StateTokenError(
                "unknown_format",
                f"has unknown format version {raw[0]} (this server reads version {FORMAT_VERSION})",
                field,
            )
        if len(raw) < _HEADER.size + _MAC_BYTES:
            raise StateTokenError("truncated", "is truncated", field)
        _, key_id, body_len = _HEADER.unpack_from(raw)
        expected = _HEADER.size + body_len + _MAC_BYTES
        if len(raw) < expected:
            raise StateTokenError("truncated", "is truncated", field)
        if len(raw) > expected:
            raise StateTokenError("garbled", "has trailing bytes", field)
        if not hmac.compare_digest(key_id, self._key_id):
            raise StateTokenError(
                "wrong_key",
                "was signed with a different server key (replicas must share "
                f"{KEY_ENV}; without it each process has its own)",
                field,
            )
        signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.digest(self._key, signed, "sha256")):
            raise StateTokenError("tampered", "failed its integrity check (tampered)", field)
        expires, version, arch, name, state = _parse_body(raw[_HEADER.size : -_MAC_BYTES], field)
        if expires and self._clock() > expires:
            raise StateTokenError("expired", "has expired", field)
        if name != binding.model or version != binding.version:
            raise StateTokenError(
                "wrong_model",
                f"was issued for model {name!r} version {version}, not {binding.model!r} "
                f"version {binding.version}",
                field,
            )
        if arch != _arch(binding.signature):
            raise StateTokenError(
                "wrong_model",
                f"was issued for a different architecture of model {name!r} version {version}",
                field,
            )
        return state

    @property
    def overhead_bytes(self) -> int:
        """Bytes a token spends besides its name and arrays (for size estimates)."""
        return _HEADER.size + _BODY_FIXED.size + 2 + _MAC_BYTES


@functools.lru_cache(maxsize=256)
def _arch(signature: str) -> bytes:
    # NOTE: cached: every seal and open asks, and a server has a handful of signatures.
    return hashlib.sha256(signature.encode()).digest()[:8]


def _parse_body(body: bytes, field: str) -> tuple[int, int, bytes, str, StreamState]:
    # NOTE: only reached after the MAC matched, so a failure here means a server bug or a
    # deliberately signed bad token; still refused cleanly rather than crashing.
    try:
        expires, version, arch, steps = _BODY_FIXED.unpack_from(body)
        at = _BODY_FIXED.size
        name_len = body[at]
        name = body[at + 1 : at + 1 + name_len].decode()
        at += 1 + name_len
        count = body[at]
        at += 1
        arrays: list[np.ndarray] = []
        for _ in range(count):
            ndim = body[at]
            dims = struct.unpack_from(f"<{ndim}I", body, at + 1)
            at += 1 + 4 * ndim
            size = 4 * math.prod(dims)  # Python ints: no overflow, no numpy call
            if at + size > len(body):
                raise ValueError("array past the end")
            flat = np.frombuffer(body, dtype="<f4", count=size // 4, offset=at)
            arrays.append(flat.reshape(dims).astype(np.float32))
            at += size
        if at != len(body):
            raise ValueError("trailing bytes")
    except (IndexError, struct.error, ValueError, UnicodeDecodeError):
        raise StateTokenError("garbled", "is garbled", field) from None
    return expires, version, arch, name, StreamState(tuple(arrays), steps)
