"""Converters at the gRPC edge: V2 tensors (raw and typed), BYTES framing, rnnserve.v1 messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.config import ModelConfig
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service.core import errors
from service.core.types import EncodeRequest, GeneratedSequence, GenerateRequest, GenerateResult
from service.grpc_api.convert import (
    decode_v2_inputs,
    encode_request_from_proto,
    float_array,
    float_values,
    generate_request_from_proto,
    plain_parameters,
    v2_infer_response,
)
from service.inference_protocol.requests import generate_outputs, infer_request, infer_sequences
from service.inference_protocol.tensors import V2_DTYPES, bytes_elements, pack_bytes
from tests.support import decode_v2_outputs


def v2_infer_request(
    request: v2.ModelInferRequest,
    config: ModelConfig,
    version: int,
    deadline_s: float | None,
    *,
    limit: int,
) -> EncodeRequest | GenerateRequest:
    """The engine's request of a V2 gRPC infer request, as the servicer builds it."""
    return infer_request(
        request.model_name,
        version,
        config,
        decode_v2_inputs(request),
        plain_parameters(request.parameters),
        limit=limit,
        deadline_s=deadline_s,
    )


FEATURES = ModelConfig.model_validate(
    {
        "format": "rnnserve/v1",
        "task": "encode",
        "input": {"type": "features", "size": 3},
        "encoder": {"cell": "lstm", "hidden_size": 4},
    }
)
SEQ2SEQ_TEXT = ModelConfig.model_validate(
    {
        "format": "rnnserve/v1",
        "task": "seq2seq",
        "input": {"type": "text", "vocab_size": 10, "embedding_size": 4, "tokenizer": "char"},
        "encoder": {"cell": "gru", "hidden_size": 4},
        "decoder": {
            "hidden_size": 4,
            "num_layers": 1,
            "embedding_size": 4,
            "vocab_size": 8,
            "bos_id": 1,
            "eos_id": 2,
            "vocab": "target_vocab.json",
        },
    }
)
TEXT = ModelConfig.model_validate(
    {
        "format": "rnnserve/v1",
        "task": "encode",
        "input": {"type": "text", "vocab_size": 10, "embedding_size": 4, "tokenizer": "char"},
        "encoder": {"cell": "gru", "hidden_size": 4},
    }
)

_NUMERIC = st.sampled_from(sorted(set(V2_DTYPES) - {"BOOL"}))


@settings(max_examples=60, deadline=None)
@given(datatype=_NUMERIC, data=st.data())
def test_raw_numeric_round_trip(datatype: str, data: st.DataObject) -> None:
    dtype = V2_DTYPES[datatype]
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    array = data.draw(hnp.arrays(dtype, shape))
    request = v2.ModelInferRequest(raw_input_contents=[array.astype(dtype).tobytes()])
    request.inputs.add(name="X", datatype=datatype, shape=shape)
    (tensor,) = decode_v2_inputs(request)
    decoded = tensor.data
    assert isinstance(decoded, np.ndarray) and tensor.shape == list(shape)
    assert decoded.shape == shape and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=20), max_size=8))
def test_bytes_framing_round_trip(items: list[bytes]) -> None:
    raw = pack_bytes(items)
    assert len(raw) == sum(4 + len(i) for i in items)
    assert bytes_elements(raw, "x", [len(items)], len(items)) == items


@pytest.mark.parametrize(
    ("raw", "count"), [(b"\x05\x00\x00\x00abc", 1), (b"\x01\x00\x00\x00ab", 1), (b"\x01\x00", 1)]
)
def test_bytes_framing_errors_name_the_field(raw: bytes, count: int) -> None:
    with pytest.raises(errors.InvalidInput, match=r"^raw_input_contents\[0\]: "):
        bytes_elements(raw, "raw_input_contents[0]", [count], count)


def test_raw_size_mismatch_names_field_and_size() -> None:
    request = v2.ModelInferRequest(raw_input_contents=[b"\x00" * 10])
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1, 3])
    with pytest.raises(errors.InvalidInput, match=r"raw_input_contents\[0\]: has 10 bytes.*12"):
        decode_v2_inputs(request)


def test_raw_count_mismatch() -> None:
    request = v2.ModelInferRequest(raw_input_contents=[b"", b""])
    request.inputs.add(name="INPUT", datatype="FP32", shape=[0])
    with pytest.raises(errors.InvalidInput, match="raw_input_contents: has 2 entries"):
        decode_v2_inputs(request)


def test_typed_contents_count_checked() -> None:
    request = v2.ModelInferRequest()
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 2, 3])
    tensor.contents.fp32_contents.extend([1.0] * 5)
    with pytest.raises(errors.InvalidInput, match=r"inputs\[0\]\.contents\.fp32_contents.*6"):
        decode_v2_inputs(request)


def test_unknown_datatype() -> None:
    request = v2.ModelInferRequest()
    request.inputs.add(name="INPUT", datatype="FP8", shape=[1])
    with pytest.raises(errors.InvalidInput, match=r"inputs\[0\]\.datatype"):
        decode_v2_inputs(request)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_features_with_lengths_cut_each_sequence(lengths: list[int]) -> None:
    rng = np.random.default_rng(len(lengths))
    batch = rng.normal(size=(len(lengths), max(lengths), 3)).astype(np.float32)
    request = v2.ModelInferRequest(
        raw_input_contents=[batch.tobytes(), np.array(lengths, "<i8").tobytes()]
    )
    request.inputs.add(name="INPUT", datatype="FP32", shape=batch.shape)
    request.inputs.add(name="LENGTHS", datatype="INT64", shape=[len(lengths)])
    kind, sequences = infer_sequences(decode_v2_inputs(request), FEATURES, 8)
    assert kind == "features"
    for i, (seq, n) in enumerate(zip(sequences, lengths, strict=True)):
        np.testing.assert_array_equal(seq, batch[i, :n])


def test_lengths_out_of_range_names_element() -> None:
    request = v2.ModelInferRequest(
        raw_input_contents=[np.zeros((2, 4, 3), "<f4").tobytes(), np.array([4, 5], "<i8").tobytes()]
    )
    request.inputs.add(name="INPUT", datatype="FP32", shape=[2, 4, 3])
    request.inputs.add(name="LENGTHS", datatype="INT64", shape=[2])
    with pytest.raises(
        errors.InvalidInput, match=r"^inputs\[1\]\.data\[1\]: length must be in 1\.\.4, got 5$"
    ):
        infer_sequences(decode_v2_inputs(request), FEATURES, 8)


def test_wrong_tensor_for_model_names_expected_input() -> None:
    request = v2.ModelInferRequest(raw_input_contents=[np.zeros((1, 2), "<i8").tobytes()])
    request.inputs.add(name="TOKENS", datatype="INT64", shape=[1, 2])
    with pytest.raises(
        errors.InvalidInput,
        match=r"^inputs\[0\]\.name: unexpected input 'TOKENS'; this model takes INPUT and optional",
    ):
        infer_sequences(decode_v2_inputs(request), FEATURES, 8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=10), min_size=1, max_size=4))
def test_text_tensor(texts: list[str]) -> None:
    request = v2.ModelInferRequest(raw_input_contents=[pack_bytes(t.encode() for t in texts)])
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    assert infer_sequences(decode_v2_inputs(request), TEXT, 8) == ("text", texts)


def test_invalid_utf8_text() -> None:
    request = v2.ModelInferRequest()
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"\xff"
    )
    with pytest.raises(errors.InvalidInput, match=r"^inputs\[0\]\.data\[0\]: TEXT elements must"):
        infer_sequences(decode_v2_inputs(request), TEXT, 8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), max_size=6), min_size=1, max_size=4))
def test_generate_outputs_round_trip(rows: list[list[int]]) -> None:
    result = GenerateResult("m", 3, [GeneratedSequence(tokens=r, text="x" * len(r)) for r in rows])
    response = v2_infer_response(
        v2.ModelInferRequest(model_name="m"), 3, generate_outputs(result, SEQ2SEQ_TEXT)
    )
    assert response.model_version == "3"
    tensors = decode_v2_outputs(response)
    tokens, lengths = tensors["OUTPUT_TOKENS"].data, tensors["OUTPUT_LENGTHS"].data
    assert isinstance(tokens, np.ndarray) and isinstance(lengths, np.ndarray)
    for row, decoded, n in zip(rows, tokens, lengths, strict=True):
        assert decoded[:n].tolist() == row and (decoded[n:] == -1).all()
    assert tensors["OUTPUT_TEXT"].data == [("x" * len(r)).encode() for r in rows]
    assert tensors["OUTPUT_TEXT"].shape == [len(rows)]


def test_unknown_requested_output() -> None:
    request = v2.ModelInferRequest()
    request.outputs.add(name="NOPE")
    result = GenerateResult("m", 1, [GeneratedSequence(tokens=[1])])
    with pytest.raises(errors.InvalidInput, match=r"outputs\[0\]\.name: unknown output 'NOPE'"):
        v2_infer_response(request, 1, generate_outputs(result, SEQ2SEQ_TEXT))


def test_encode_request_from_proto() -> None:
    message = pb.EncodeRequest(model="m", version=2, pooling="mean", timeout_ms=500)
    seq = message.inputs.sequences.add(shape=[2, 3], values=[1, 2, 3, 4, 5, 6])
    assert len(seq.values) == 6
    request = encode_request_from_proto(message, deadline_s=0.2)
    assert (request.model, request.version, request.pooling, request.kind) == (
        "m",
        2,
        "mean",
        "features",
    )
    assert request.timeout_s == pytest.approx(0.2)
    assert isinstance(request.sequences[0], np.ndarray)
    np.testing.assert_array_equal(request.sequences[0], [[1, 2, 3], [4, 5, 6]])


def test_encode_request_errors_name_the_field() -> None:
    message = pb.EncodeRequest(model="m")
    with pytest.raises(errors.InvalidInput, match=r"^input: one of"):
        encode_request_from_proto(message)
    message.inputs.sequences.add(shape=[2, 3], values=[1.0])
    with pytest.raises(errors.InvalidInput, match=r"^inputs\[0\]\.values: has 1 numbers.*6"):
        encode_request_from_proto(message)
    with pytest.raises(errors.InvalidInput, match=r"^pooling: 'avg' is not one of"):
        encode_request_from_proto(pb.EncodeRequest(model="m", pooling="avg"))


def test_generate_request_defaults() -> None:
    message = pb.GenerateRequest(model="m", texts=pb.TextInputs(texts=["a", "b"]))
    request = generate_request_from_proto(message)
    assert (request.beam_size, request.max_length, request.version, request.timeout_s) == (
        1,
        None,
        None,
        None,
    )
    assert request.sequences == ["a", "b"] and request.kind == "text"


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)))
def test_float_array_fast_path_matches_protobuf(array: np.ndarray) -> None:
    fast = float_array(array)
    reference = pb.FloatArray(shape=array.shape, values=array.ravel().tolist())
    assert list(fast.shape) == list(reference.shape)
    np.testing.assert_array_equal(np.array(fast.values, np.float32), array.ravel())
    parsed = pb.FloatArray.FromString(reference.SerializeToString())
    decoded = float_values(parsed)
    assert decoded.dtype == np.float32 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array.ravel())


def test_float_values_reads_unpacked_wire_format() -> None:
    # A peer may send repeated floats unpacked (tag 0x15 per element); parsers accept both.
    values = np.array([1.5, -2.0, 3.25], "<f4")
    wire = b"\x0a\x02\x03\x01" + b"".join(b"\x15" + v.tobytes() for v in values)
    array = pb.FloatArray.FromString(wire)
    assert list(array.shape) == [3, 1]
    np.testing.assert_array_equal(float_values(array), values)


@pytest.mark.parametrize("timeout_ms", [3_600_001, 4_000_000_000])
def test_v1_timeout_ms_above_the_limit_is_refused(timeout_ms: int) -> None:
    message = pb.EncodeRequest(model="m", timeout_ms=timeout_ms)
    message.inputs.sequences.add(shape=[1, 3], values=[1, 2, 3])
    with pytest.raises(errors.InvalidInput, match=r"^timeout_ms: .*at most 3600000 ms"):
        encode_request_from_proto(message)


def _v2_features(**params: v2.InferParameter) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="m")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1, 3]).contents.fp32_contents[:] = [
        1.0,
        2.0,
        3.0,
    ]
    for name, value in params.items():
        request.parameters[name].CopyFrom(value)
    return request


@pytest.mark.parametrize(
    "param",
    [
        v2.InferParameter(int64_param=0),
        v2.InferParameter(int64_param=-5),
        v2.InferParameter(int64_param=3_600_001),
        v2.InferParameter(double_param=-0.5),
    ],
)
def test_v2_timeout_ms_out_of_range_is_refused(param: v2.InferParameter) -> None:
    request = _v2_features(timeout_ms=param)
    with pytest.raises(
        errors.InvalidInput, match=r"^parameters\.timeout_ms: must be greater than 0 and at most"
    ):
        v2_infer_request(request, FEATURES, 1, None, limit=8)


def test_v2_timeout_ms_takes_the_tighter_of_it_and_the_deadline() -> None:
    request = _v2_features(timeout_ms=v2.InferParameter(double_param=250.0))
    assert v2_infer_request(request, FEATURES, 1, None, limit=8).timeout_s == pytest.approx(0.25)
    assert v2_infer_request(request, FEATURES, 1, 0.1, limit=8).timeout_s == pytest.approx(0.1)
