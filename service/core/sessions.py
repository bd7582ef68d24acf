"""Streaming sessions: a sequence sent in chunks, the RNN state carried between them.

Two ways to hold the state between chunks:
- server-held sessions (`SessionManager.create` → id → `chunk` … → `close`), with an idle timeout
  and a maximum number of open sessions (over it, new sessions are refused, never evicted);
- portable state tokens (`SessionManager.stream`): the state travels with the client, sealed by
  `service.core.state_tokens`, so any replica with the same key can take the next chunk.

A stream state is the RNN's state (h, and c for an LSTM; each float32 [L, H]) plus running
pooling accumulators (sum and max of the top layer's outputs over all steps so far; each [E]) and
the step count, so that after the last chunk "last", "mean" and "max" equal encoding the whole
sequence at once. Each chunk runs through the engine's encode batcher with its row's initial
state, so chunks of many sessions share batches with each other and with plain encode requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.config import ModelConfig
from models.config import Pooling as ConfigPooling
from service.core.errors import Conflict, Draining, InvalidInput, NotFound, Overloaded, shown
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.core.state_tokens import (
    StateTokenCodec,
    StateTokenError,
    StreamState,
    TokenBinding,
    load_key,
)
from service.core.types import (
    ChunkOutput,
    ChunkRequest,
    Head,
    HostState,
    InputKind,
    Pooling,
    SequenceData,
)

log = logging.getLogger(__name__)

BIDIRECTIONAL_REASON = (
    "a bidirectional encoder reads the whole sequence backwards, so it cannot be streamed "
    "incrementally"
)
SEQ2SEQ_REASON = "streaming sessions serve encoder models; a seq2seq model is used with generate"


class StreamBackend(Protocol):
    """What sessions need from the engine (`service.core.engine.Engine` provides it)."""

    @property
    def draining(self) -> bool:
        """True once the server admits no new work."""
        ...

    def model_config(self, name: str, version: int | None = None) -> tuple[int, ModelConfig]:
        """The READY version's number and config."""
        ...

    def model_head(self, name: str, version: int) -> Head | None:
        """The head's parameters as numpy arrays, or None when the model has no head."""
        ...

    async def encode_chunk(self, request: ChunkRequest) -> ChunkOutput:
        """Encode one chunk from `initial_state` (None = zeros) through the encode batcher."""
        ...


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """The answer to one chunk."""

    model: str
    version: int
    # float32 [E] pooled over every step so far, or [T, E] (this chunk's steps) for "none".
    encoding: np.ndarray
    steps: int  # time steps consumed so far, this chunk included
    scores: np.ndarray | None = None  # [S], from the config's pooling over every step so far
    label: str | None = None
    state_token: bytes | None = None  # raw; JSON front-ends send it as base64url


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    model: str
    version: int
    pooling: Pooling
    steps: int


@dataclass
class _Session:
    id: str
    model: str
    version: int
    config: ModelConfig
    pooling: Pooling
    return_state: bool
    state: StreamState
    last_used: float
    busy: bool = False


# --- the stream arithmetic (pure numpy) ------------------------------------------------------


def signature(config: ModelConfig) -> str:
    """Every architecture detail a stream state depends on (tokens are bound to it)."""
    enc = config.encoder
    spec = config.input
    size = spec.size if spec.type == "features" else f"{spec.vocab_size}x{spec.embedding_size}"
    head = config.head.size if config.head is not None else 0
    return (
        f"{spec.type}:{size}|{enc.cell}|{enc.activation}|{enc.gru_reset_after}|h{enc.hidden_size}"
        f"|l{enc.num_layers}|d{enc.num_directions}|pool:{config.pooling}|head:{head}"
    )


def check_streamable(config: ModelConfig) -> None:
    """Raise `InvalidInput` when the model cannot be streamed (seq2seq, bidirectional)."""
    if config.task != "encode":
        raise InvalidInput("model", SEQ2SEQ_REASON)
    if config.encoder.bidirectional:
        raise InvalidInput("model", BIDIRECTIONAL_REASON)


def state_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes of a stream state's arrays: h (and c for an LSTM) [L, H], sum [E], max [E]."""
    enc = config.encoder
    rnn = (enc.num_layers, enc.hidden_size)
    pooled = (config.encoding_size,)
    return [rnn, rnn, pooled, pooled] if enc.cell == "lstm" else [rnn, pooled, pooled]


def initial_state(config: ModelConfig) -> StreamState:
    """The state before the first step: zero RNN state, empty accumulators."""
    *zeros, peak = state_shapes(config)
    arrays = [np.zeros(shape, dtype=np.float32) for shape in zeros]
    arrays.append(np.full(peak, -np.inf, dtype=np.float32))
    return StreamState(tuple(arrays), steps=0)


def check_state(config: ModelConfig, state: StreamState, field: str) -> None:
    """Raise `StateTokenError` unless `state` has this model's shapes (a signed but wrong token)."""
    want = state_shapes(config)
    if [a.shape for a in state.arrays] != want:
        raise StateTokenError("garbled", "does not hold this model's state shapes", field)


def rnn_state(state: StreamState) -> HostState | None:
    """The RNN part of a stream state; None before the first step (the model starts at zeros)."""
    return None if state.steps == 0 else tuple(state.arrays[:-2])


def advance(state: StreamState, chunk: ChunkOutput) -> StreamState:
    """The state after `chunk`: its final RNN state, accumulators updated, steps counted."""
    outputs = chunk.outputs  # float32 [T, E]
    # NOTE: ufunc reductions straight, in place on the fresh results: this runs once per chunk
    # on the event loop, where numpy's method wrappers and extra copies add up.
    total = np.add.reduce(outputs, axis=0)
    total += state.arrays[-2]
    peak = np.maximum.reduce(outputs, axis=0)
    np.maximum(peak, state.arrays[-1], out=peak)
    return StreamState((*chunk.final_state, total, peak), steps=state.steps + len(outputs))


def pooled(pooling: ConfigPooling, state: StreamState, last: np.ndarray) -> np.ndarray:
    """The encoding of every step so far; `last` is the newest step's output [E]."""
    if pooling == "last":
        return last
    if pooling == "mean":
        return state.arrays[-2] / np.float32(state.steps)  # float32 / float32: float32
    return state.arrays[-1]


def head_scores(head: Head, encoding: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Scores [S] of the head on `encoding` [E] (softmax with labels) and the arg-max label."""
    # NOTE: a [S, E] matrix-vector product per chunk: microseconds, so it runs on the loop rather
    # than costing a second trip through the executor.
    raw = head.weight @ encoding + head.bias  # [S]
    if head.labels is None:
        return raw.astype(np.float32), None
    exp = np.exp(raw - raw.max())
    probs = (exp / exp.sum()).astype(np.float32)
    return probs, head.labels[int(probs.argmax())]


# --- the manager -----------------------------------------------------------------------------


class SessionManager:
    """Server-held sessions and stateless token streaming over one `StreamBackend`."""

    def __init__(
        self,
        backend: StreamBackend,
        codec: StateTokenCodec,
        *,
        max_sessions: int = 10_000,
        idle_timeout_s: float = 300.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.backend = backend
        self.codec = codec
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._metrics = metrics
        self._sessions: dict[str, _Session] = {}
        # NOTE: remembers recently expired ids (bounded) so their next chunk hears "expired"
        # rather than "unknown session".
        self._expired: OrderedDict[str, str] = OrderedDict()
        self._expired_limit = max(1024, max_sessions)
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, backend: StreamBackend, settings: Settings, metrics: Metrics | None
    ) -> SessionManager:
        """A manager configured by `settings` (key, limits); warns when no key is set."""
        secret = settings.state_key.get_secret_value() if settings.state_key is not None else None
        key, _ = load_key(secret)
        return cls(
            backend,
            StateTokenCodec(key, ttl_s=settings.state_token_ttl_s),
            max_sessions=settings.max_sessions,
            idle_timeout_s=settings.session_idle_timeout_s,
            metrics=metrics,
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the idle reaper (inside the running loop)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="session-reaper")

    async def stop(self) -> None:
        """Stop the reaper and close every session."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for session in list(self._sessions.values()):
            self._remove(session)

    @property
    def active(self) -> int:
        """Open server-held sessions."""
        return len(self._sessions)

    # --- server-held sessions ------------------------------------------------------------------

    def create(
        self,
        model: str,
        version: int | None = None,
        *,
        pooling: Pooling | None = None,
        return_state: bool = False,
        state_token: str | bytes | None = None,
    ) -> SessionInfo:
        """Open a session (optionally resuming a state token); refuse over the limit."""
        if self.backend.draining:
            raise Draining("the server is shutting down and opens no new sessions")
        number, config = self.backend.model_config(model, version)
        self._check_streamable(model, config)
        if len(self._sessions) >= self.max_sessions:
            self._count_refused(model, "limit")
            raise Overloaded(
                f"session limit reached: {self.max_sessions} sessions are open (max_sessions); "
                "close a session, let idle ones expire, or stream with state tokens",
                retry_after_s=1.0,
            )
        state = self._open_token(model, number, config, state_token)
        session_id = secrets.token_urlsafe(24)
        self._sessions[session_id] = _Session(
            id=session_id,
            model=model,
            version=number,
            config=config,
            pooling=pooling or config.pooling,
            return_state=return_state,
            state=state,
            last_used=time.monotonic(),
        )
        if self._metrics is not None:
            self._metrics.sessions_active.labels(model).inc()
        log.info("session opened", extra={"model": model, "version": number})
        return SessionInfo(session_id, model, number, pooling or config.pooling, state.steps)

    async def chunk(
        self,
        session_id: str,
        sequence: SequenceData,
        kind: InputKind,
        *,
        timeout_s: float | None = None,
    ) -> ChunkResult:
        """Feed one chunk to a session; the answer covers every step so far."""
        self._check_admitting(session_id)
        session = self._get(session_id)
        if session.busy:
            raise Conflict(
                f"session {session_id} is still processing a chunk; send chunks one at a time"
            )
        session.busy = True
        try:
            result, state = await self._step(
                session.model,
                session.version,
                session.config,
                session.state,
                sequence,
                kind,
                session.pooling,
                session.return_state,
                timeout_s,
            )
        finally:
            session.busy = False
            session.last_used = time.monotonic()
        session.state = state
        self._count_chunk(session.model, "session")
        return result

    def close(self, session_id: str) -> SessionInfo:
        """Close a session; its state is dropped."""
        session = self._get(session_id)
        self._remove(session)
        return self._info(session)

    def peek(self, session_id: str) -> SessionInfo | None:
        """A session's info if it is open, else None (never raises; for metric labels)."""
        session = self._sessions.get(session_id)
        return None if session is None else self._info(session)

    def info(self, session_id: str) -> SessionInfo:
        """What a session is and how far it got."""
        return self._info(self._get(session_id))

    # --- portable state ------------------------------------------------------------------------

    async def stream(
        self,
        model: str,
        sequence: SequenceData,
        kind: InputKind,
        *,
        version: int | None = None,
        pooling: Pooling | None = None,
        state_token: str | bytes | None = None,
        timeout_s: float | None = None,
    ) -> ChunkResult:
        """One stateless chunk: state in by token (None = start), new token out."""
        if self.backend.draining:
            raise Draining("the server is shutting down and takes no new chunks")
        number, config = self.backend.model_config(model, version)
        self._check_streamable(model, config)
        state = self._open_token(model, number, config, state_token)
        result, _ = await self._step(
            model,
            number,
            config,
            state,
            sequence,
            kind,
            pooling or config.pooling,
            True,
            timeout_s,
        )
        self._count_chunk(model, "token")
        return result

    # --- internals -----------------------------------------------------------------------------

    async def _step(
        self,
        model: str,
        version: int,
        config: ModelConfig,
        state: StreamState,
        sequence: SequenceData,
        kind: InputKind,
        pooling: Pooling,
        return_state: bool,
        timeout_s: float | None,
    ) -> tuple[ChunkResult, StreamState]:
        out = await self.backend.encode_chunk(
            ChunkRequest(model, version, sequence, kind, rnn_state(state), timeout_s)
        )
        new = advance(state, out)
        last = out.outputs[-1]
        encoding = out.outputs if pooling == "none" else pooled(pooling, new, last)
        scores: np.ndarray | None = None
        label: str | None = None
        head = self.backend.model_head(model, version)
        if head is not None:
            scores, label = head_scores(head, pooled(config.pooling, new, last))
        token = None
        if return_state:
            token = self.codec.seal(TokenBinding(model, version, signature(config)), new)
        return ChunkResult(model, version, encoding, new.steps, scores, label, token), new

    def _open_token(
        self, model: str, version: int, config: ModelConfig, token: str | bytes | None
    ) -> StreamState:
        if token is None:
            return initial_state(config)
        if not token:
            # NOTE: an empty token is a client's bug (a lost token), not "start over": a stream
            # silently restarted from zeros would answer wrongly without a word.
            raise InvalidInput("state_token", "is empty; leave it out to start a new stream")
        binding = TokenBinding(model, version, signature(config))
        if isinstance(token, bytes):
            state = self.codec.open(token, binding)
        else:
            state = self.codec.decode(token, binding)
        check_state(config, state, "state_token")
        return state

    def _info(self, session: _Session) -> SessionInfo:
        return SessionInfo(
            session.id, session.model, session.version, session.pooling, session.state.steps
        )

    def _check_streamable(self, model: str, config: ModelConfig) -> None:
        try:
            check_streamable(config)
        except InvalidInput:
            self._count_refused(model, "not_streamable")
            raise

    def _get(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is not None and not session.busy and self._idle(session, time.monotonic()):
            self._expire(session)
            session = None
        if session is None:
            # NOTE: sessions close when the server drains; their clients hear why.
            self._check_admitting(session_id)
            if session_id in self._expired:
                raise NotFound(
                    f"session {shown(session_id)} expired after {self.idle_timeout_s:g} s idle; "
                    "open a new session (or resume it from its last state_token)"
                )
            raise NotFound(f"no session {shown(session_id)} (never opened, or closed)")
        return session

    def _check_admitting(self, session_id: str) -> None:
        if self.backend.draining:
            raise Draining(
                f"the server is shutting down: session {shown(session_id)} takes no more "
                "chunks; resume it on another replica from its last state_token"
            )

    def _idle(self, session: _Session, now: float) -> bool:
        return now - session.last_used > self.idle_timeout_s

    def _expire(self, session: _Session) -> None:
        self._remove(session)
        self._expired[session.id] = session.model
        while len(self._expired) > self._expired_limit:
            self._expired.popitem(last=False)
        if self._metrics is not None:
            self._metrics.sessions_expired_total.labels(session.model).inc()
        log.info("session expired", extra={"model": session.model, "version": session.version})

    def _remove(self, session: _Session) -> None:
        if self._sessions.pop(session.id, None) is not None and self._metrics is not None:
            self._metrics.sessions_active.labels(session.model).dec()

    async def _reap_forever(self) -> None:
        period = min(1.0, max(0.01, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            self.reap()

    def reap(self) -> int:
        """Expire every idle session now; returns how many."""
        now = time.monotonic()
        idle = [s for s in self._sessions.values() if not s.busy and self._idle(s, now)]
        for session in idle:
            self._expire(session)
        return len(idle)

    def _count_refused(self, model: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.sessions_refused_total.labels(model, reason).inc()

    def _count_chunk(self, model: str, mode: str) -> None:
        if self._metrics is None:
            return
        self._metrics.child(self._metrics.session_chunks_total, model, mode).inc()
