"""Portable state tokens: round trip, and every way a token can be wrong is refused by name."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import InvalidInput
from service.core.state_tokens import (
    FORMAT_VERSION,
    StateTokenCodec,
    StateTokenError,
    StreamState,
    TokenBinding,
    load_key,
)

KEY = b"k" * 32
BINDING = TokenBinding("tagger", 3, "lstm|features:8|h16|l2|d1")


def _state(seed: int = 0, layers: int = 2, hidden: int = 16) -> StreamState:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((layers, hidden)).astype(np.float32)
    c = rng.standard_normal((layers, hidden)).astype(np.float32)
    total = rng.standard_normal(hidden).astype(np.float32)
    return StreamState((h, c, total), steps=17 + seed)


def _refusal(codec: StateTokenCodec, raw: bytes, binding: TokenBinding = BINDING) -> str:
    with pytest.raises(StateTokenError) as info:
        codec.open(raw, binding)
    assert isinstance(info.value, InvalidInput)
    assert info.value.field == "state_token"
    return info.value.reason


arrays = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 9)).flatmap(
        lambda shape: st.lists(
            st.floats(width=32, allow_nan=False),
            min_size=shape[0] * shape[1],
            max_size=shape[0] * shape[1],
        ).map(lambda v, s=shape: np.array(v, dtype=np.float32).reshape(s))
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(arrays=arrays, steps=st.integers(0, 2**63), name=st.text(min_size=1, max_size=40))
def test_round_trip(arrays: list[np.ndarray], steps: int, name: str) -> None:
    codec = StateTokenCodec(KEY)
    binding = TokenBinding(name, 7, "gru")
    state = StreamState(tuple(arrays), steps)
    opened = codec.decode(codec.encode(binding, state), binding)
    assert opened.steps == steps
    assert len(opened.arrays) == len(arrays)
    for got, want in zip(opened.arrays, arrays, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_refused(data: st.DataObject) -> None:
    codec = StateTokenCodec(KEY)
    raw = bytearray(codec.seal(BINDING, _state()))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    reason = _refusal(codec, bytes(raw))
    # The format byte and the key id are checked before the MAC; everything else is "tampered".
    if at == 0:
        assert reason == "unknown_format"
    elif at < 9:
        assert reason == "wrong_key"
    elif at < 13:
        assert reason in {"truncated", "garbled"}
    else:
        assert reason == "tampered"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_truncation_is_refused(data: st.DataObject) -> None:
    codec = StateTokenCodec(KEY)
    raw = codec.seal(BINDING, _state())
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert _refusal(codec, raw[:cut]) == "truncated"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_text_character_change_is_refused(data: st.DataObject) -> None:
    codec = StateTokenCodec(KEY)
    text = codec.encode(BINDING, _state())
    at = data.draw(st.integers(0, len(text) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    new = data.draw(st.sampled_from(alphabet).filter(lambda c: c != text[at]))
    with pytest.raises(StateTokenError):
        codec.decode(text[:at] + new + text[at + 1 :], BINDING)


def test_wrong_model_version_or_architecture_is_refused() -> None:
    codec = StateTokenCodec(KEY)
    raw = codec.seal(BINDING, _state())
    for other in (
        TokenBinding("other", 3, BINDING.signature),
        TokenBinding("tagger", 4, BINDING.signature),
        TokenBinding("tagger", 3, "gru|features:8|h16|l2|d1"),
    ):
        with pytest.raises(StateTokenError) as info:
            codec.open(raw, other)
        assert info.value.reason == "wrong_model"
        assert "tagger" in info.value.message


def test_wrong_key_is_refused_distinctly() -> None:
    raw = StateTokenCodec(b"a" * 32).seal(BINDING, _state())
    with pytest.raises(StateTokenError) as info:
        StateTokenCodec(b"b" * 32).open(raw, BINDING)
    assert info.value.reason == "wrong_key"
    assert "RNNSERVE_STATE_KEY" in info.value.message


def test_unknown_format_version_is_refused() -> None:
    codec = StateTokenCodec(KEY)
    raw = bytearray(codec.seal(BINDING, _state()))
    raw[0] = FORMAT_VERSION + 1
    with pytest.raises(StateTokenError) as info:
        codec.open(bytes(raw), BINDING)
    assert info.value.reason == "unknown_format"
    assert f"version {FORMAT_VERSION + 1}" in info.value.message


def test_garbled_text_is_refused() -> None:
    codec = StateTokenCodec(KEY)
    for text in ("not base64!", "****", "A"):
        with pytest.raises(StateTokenError) as info:
            codec.decode(text, BINDING)
        assert info.value.reason in {"garbled", "unknown_format", "truncated"}
    # A valid base64 spelling with extra bytes after the MAC.
    raw = codec.seal(BINDING, _state()) + b"\0"
    assert _refusal(codec, raw) == "garbled"
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(StateTokenError):
        codec.decode(text, BINDING)


def test_size_limit() -> None:
    codec = StateTokenCodec(KEY, max_bytes=256)
    with pytest.raises(ValueError, match="exceeds 256"):
        codec.seal(BINDING, _state())
    with pytest.raises(StateTokenError) as info:
        codec.decode("A" * 10_000, BINDING)
    assert info.value.reason == "too_large"


def test_expiry() -> None:
    now = [1_000_000.0]
    codec = StateTokenCodec(KEY, ttl_s=60, clock=lambda: now[0])
    raw = codec.seal(BINDING, _state())
    now[0] += 30
    assert codec.open(raw, BINDING).steps == 17
    now[0] += 60
    assert _refusal(codec, raw) == "expired"


def test_load_key() -> None:
    key, ephemeral = load_key("0123456789abcdef-shared")
    assert key == b"0123456789abcdef-shared" and not ephemeral
    random_key, ephemeral = load_key(None)
    assert ephemeral and len(random_key) == 32 and load_key(None)[0] != random_key
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_key("short")


def test_refusal_messages_say_what_is_wrong() -> None:
    now = [1_000_000.0]
    codec = StateTokenCodec(KEY, ttl_s=60, clock=lambda: now[0])
    raw = codec.seal(BINDING, _state())
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x80  # inside the state arrays: only the MAC can tell
    cases = {
        "tampered": bytes(flipped),
        "truncated": raw[:-1],
        "wrong_key": StateTokenCodec(b"o" * 32).seal(BINDING, _state()),
    }
    messages = {}
    for reason, bad in cases.items():
        with pytest.raises(StateTokenError) as info:
            codec.open(bad, BINDING)
        assert info.value.reason == reason
        messages[reason] = info.value.message
    now[0] += 120
    with pytest.raises(StateTokenError, match="state_token: has expired"):
        codec.open(raw, BINDING)
    assert messages["tampered"] == "state_token: failed its integrity check (tampered)"
    assert messages["truncated"] == "state_token: is truncated"
    assert messages["wrong_key"].startswith("state_token: was signed with a different server key")
