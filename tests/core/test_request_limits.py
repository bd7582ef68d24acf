"""What a request may cost, decided before it is parsed: JSON values, protobuf values and fields,
and the size of the answer it asks for."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import ModelConfig
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service.core import limits
from service.core.errors import InvalidInput, PayloadTooLarge
from service.core.settings import Settings
from service.core.types import AnswerLimit
from service.grpc_api.message_limits import SCAN_ABOVE_BYTES, MessageLimits
from service.http_api import json_codecs as codecs
from service.inference_protocol import tensors as v2_tensors
from tests.factories import make_config


def values_in(value: Any) -> int:
    """The values orjson builds for a parsed JSON value (containers and scalars)."""
    if isinstance(value, list):
        return 1 + sum(values_in(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(values_in(v) for v in value.values())
    return 1


# Strings full of what the count looks for, escapes and quotes included.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('ab,[]{}"\\\n é')), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TRICKY_TEXT, inner, max_size=5),
    max_leaves=40,
)  # fmt: skip


@given(JSON)
@settings(max_examples=300, deadline=None)
def test_json_values_bound_what_orjson_builds_and_ignore_strings(value: Any) -> None:
    body = orjson.dumps(value)
    counted = codecs.json_values(body)
    assert counted >= values_in(value)
    # Only empty containers are counted one too many: separators in strings never count.
    empties = body.count(b"[]") + body.count(b"{}")
    assert counted <= values_in(value) + empties


def test_a_body_over_the_value_limit_is_refused_before_parsing() -> None:
    rows = b'{"inputs":[[' + b",".join([b"[0]"] * 5000) + b"]]}"
    with pytest.raises(PayloadTooLarge) as refused:
        codecs.loads(rows, max_values=4096)
    assert refused.value.field == "body"
    assert "10,003 JSON values" in refused.value.message and "4,096" in refused.value.message
    assert "max-request-values" in refused.value.message
    assert codecs.loads(rows, max_values=10_003)["inputs"][0][0] == [0]


def test_text_full_of_separators_is_not_mistaken_for_values() -> None:
    texts = ["[[,{" * 500 + '\\"' + ",,," * 500] * 4
    body = orjson.dumps({"texts": texts})
    assert len(body) > 4096
    assert codecs.loads(body, max_values=4096)["texts"] == texts


def test_sequences_over_the_model_length_are_refused_before_conversion() -> None:
    with pytest.raises(InvalidInput, match=r"inputs\[1\]: 9 steps; .*max_sequence_length is 8"):
        codecs.features_from_json([[[0.0]], [[0.0]] * 9], max_steps=8)
    with pytest.raises(InvalidInput, match=r"tokens\[0\]: 9 steps"):
        codecs.tokens_from_json([[1] * 9], max_steps=8)
    assert len(codecs.tokens_from_json([[1] * 8], max_steps=8)[0]) == 8


def test_v2_binary_bytes_stop_at_the_shape_count() -> None:
    raw = v2_tensors.pack_bytes([b"a"] * 10)
    with pytest.raises(InvalidInput, match="more than 2 BYTES elements"):
        v2_tensors.unpack_bytes(raw, "x", 2)
    assert v2_tensors.unpack_bytes(raw, "x", 10) == [b"a"] * 10


# --- protobuf messages -------------------------------------------------------------------------

LIMITS = MessageLimits(max_values=100_000, max_fields=1000)


def _int64_request(count: int) -> bytes:
    request = v2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, count])
    tensor.contents.int64_contents.extend(range(count))
    return request.SerializeToString()


def test_packed_integers_count_one_value_each() -> None:
    LIMITS.check(_int64_request(99_000), v2.ModelInferRequest.DESCRIPTOR)
    with pytest.raises(PayloadTooLarge) as refused:
        LIMITS.check(_int64_request(400_000), v2.ModelInferRequest.DESCRIPTOR)
    assert refused.value.field == "request"
    assert "about 400,0" in refused.value.message and "100,000" in refused.value.message


def test_strings_and_messages_count_as_fields() -> None:
    texts = pb.EncodeRequest(model="m")
    texts.texts.texts.extend(["x" * 2000] * 2000)  # 4 MB: walked
    with pytest.raises(PayloadTooLarge, match="more than 1,000 fields"):
        LIMITS.check(texts.SerializeToString(), pb.EncodeRequest.DESCRIPTOR)
    sequences = pb.EncodeRequest(model="m")
    for _ in range(600):
        sequences.tokens.sequences.add(ids=list(range(2000)))
    with pytest.raises(PayloadTooLarge, match="fields"):
        LIMITS.check(sequences.SerializeToString(), pb.EncodeRequest.DESCRIPTOR)


def test_raw_contents_and_floats_are_not_counted() -> None:
    raw = v2.ModelInferRequest(model_name="m")
    raw.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1_000_000, 1])
    raw.raw_input_contents.append(np.zeros(1_000_000, np.float32).tobytes())
    LIMITS.check(raw.SerializeToString(), v2.ModelInferRequest.DESCRIPTOR)
    floats = pb.EncodeRequest(model="m")
    floats.inputs.sequences.add(shape=[500_000, 1], values=[0.5] * 500_000)
    LIMITS.check(floats.SerializeToString(), pb.EncodeRequest.DESCRIPTOR)


def test_small_and_malformed_messages_are_left_to_protobuf() -> None:
    small = _int64_request(SCAN_ABOVE_BYTES // 8)
    assert len(small) <= SCAN_ABOVE_BYTES
    MessageLimits(max_values=1024, max_fields=8).check(small, v2.ModelInferRequest.DESCRIPTOR)
    garbage = b"\x0a\xff\xff\xff\x0f" + b"\x00" * (SCAN_ABOVE_BYTES + 10)
    LIMITS.check(garbage, v2.ModelInferRequest.DESCRIPTOR)


def test_the_default_value_limit_follows_the_sequence_limit() -> None:
    assert Settings().request_values_limit == 1024 * 4096 + 65536
    assert Settings(max_sequences_per_request=8).request_values_limit == 8 * 4096 + 65536
    assert Settings(max_request_values=5000).request_values_limit == 5000
    assert MessageLimits.from_settings(Settings(max_sequences_per_request=8)).max_fields == 4128


# --- answers -----------------------------------------------------------------------------------


def _encoder(size: int) -> ModelConfig:
    return make_config(input_type="features", input_size=2, hidden_size=size)


def test_answer_size_counts_every_step_for_pooling_none() -> None:
    config = _encoder(8)  # encodings of 8 numbers
    arrays = [np.zeros((100, 2), np.float32), np.zeros((50, 2), np.float32)]
    json_limit = AnswerLimit(150 * 8 * 16, 16, False, "--max-answer-bytes")
    limits.check_answer_size(config, "features", arrays, "none", json_limit)
    limits.check_answer_size(config, "features", arrays, "mean", json_limit)
    with pytest.raises(InvalidInput) as refused:
        limits.check_answer_size(config, "features", [*arrays, arrays[1]], "none", json_limit)
    assert refused.value.field == "inputs"
    message = refused.value.message
    assert (
        "25,600 bytes (1,600 numbers)" in message and "19,200 bytes (--max-answer-bytes)" in message
    )
    assert "pooled encoding" in message
    # V2 pads every row to the longest: 2 rows × 100 steps.
    padded = AnswerLimit(150 * 8 * 4, 4, True, "--max-answer-bytes")
    with pytest.raises(InvalidInput, match="6,400 bytes"):
        limits.check_answer_size(config, "features", arrays, "none", padded)
