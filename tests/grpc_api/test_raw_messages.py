"""The hot RPCs' messages read and written by hand (service/grpc_api/raw_messages.py) agree with
protobuf: every answer byte for byte, every request field for field, and a request the reader
does not take (or protobuf refuses) goes to protobuf."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service.core import errors
from service.core.types import EncodeResult
from service.grpc_api.convert import (
    encode_request_from_proto,
    encode_request_from_raw,
    encode_result_to_proto,
    float_array,
    float_values,
    v2_infer_response,
)
from service.grpc_api.raw_messages import (
    encode_response,
    float32_values,
    infer_response,
    read_encode_request,
)
from service.inference_protocol.tensors import V2_DTYPES, V2Output

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(max_size=12)
uint32 = st.integers(0, 2**32 - 1)
float32_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)


@st.composite
def encode_requests(draw: st.DrawFn) -> pb.EncodeRequest:
    """EncodeRequests of feature sequences, of any shape (valid or not) and field values."""
    message = pb.EncodeRequest(model=draw(texts), pooling=draw(texts), timeout_ms=draw(uint32))
    version = draw(st.none() | uint32)
    if version is not None:
        message.version = version
    message.inputs.SetInParent()
    for array in draw(st.lists(float32_arrays, max_size=4)):
        sequence = message.inputs.sequences.add()
        sequence.CopyFrom(float_array(array))
        if draw(st.booleans()):
            # A shape that does not match the values, or none at all.
            del sequence.shape[:]
            sequence.shape.extend(draw(st.lists(uint32, max_size=3)))
    return message


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    return a.shape == b.shape and a.view(np.uint32).tolist() == b.view(np.uint32).tolist()


def assert_reads_as_protobuf(data: bytes) -> None:
    """The reader takes `data` as protobuf parses it, or leaves it to protobuf (None)."""
    raw = read_encode_request(data)
    try:
        message = pb.EncodeRequest.FromString(data)
    except DecodeError:
        assert raw is None, "read a message protobuf refuses"
        return
    if raw is None:
        return
    assert message.WhichOneof("input") == "inputs"
    assert raw.model == message.model and raw.pooling == message.pooling
    assert raw.timeout_ms == message.timeout_ms
    assert raw.version == (message.version if message.HasField("version") else None)
    assert len(raw.sequences) == len(message.inputs.sequences)
    for (shape, offset, count), array in zip(raw.sequences, message.inputs.sequences, strict=True):
        assert shape == list(array.shape)
        # NOTE: protobuf's own bits (`float_values` reads its serialised array): `array.values`
        # goes through Python floats, which quiet a signalling NaN.
        assert same_floats(float32_values(data, offset, count), float_values(array))


@PROPERTY
@given(encode_requests())
def test_an_encode_request_reads_as_protobuf_parses_it(message: pb.EncodeRequest) -> None:
    data = message.SerializeToString()
    if all(len(a.shape) <= 2 for a in message.inputs.sequences):
        assert read_encode_request(data) is not None, "protobuf's own layout must be read"
    assert_reads_as_protobuf(data)


@PROPERTY
@given(encode_requests(), st.data())
def test_a_damaged_or_odd_encode_request_is_read_as_protobuf_or_left_to_it(
    message: pb.EncodeRequest, data: st.DataObject
) -> None:
    wire = bytearray(message.SerializeToString())
    edit = data.draw(st.sampled_from(["flip", "cut", "append", "twice", "unknown", "unpacked"]))
    if edit == "flip" and wire:
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    elif edit == "cut" and wire:
        del wire[data.draw(st.integers(0, len(wire) - 1)) :]
    elif edit == "append":
        wire += data.draw(st.binary(max_size=12))
    elif edit == "twice":
        # Two messages back to back merge: scalars from the second, sequences concatenated.
        wire += pb.EncodeRequest(model=data.draw(texts), timeout_ms=1).SerializeToString()
    elif edit == "unknown":
        wire += b"\x40\x01"  # field 8, varint 1
    elif edit == "unpacked":
        values = data.draw(st.lists(st.floats(width=32), min_size=1, max_size=3))
        body = b"\x08\x01" + b"".join(b"\x15" + np.float32(v).tobytes() for v in values)
        wire += b"\x1a" + bytes([len(body) + 2, 0x0A, len(body)]) + body
    assert_reads_as_protobuf(bytes(wire))


@PROPERTY
@given(st.binary(max_size=64))
@example(b"\x80\x80\x80\x80\x80-")  # a field number of 2**32 and more
def test_arbitrary_bytes_are_read_as_protobuf_or_left_to_it(data: bytes) -> None:
    assert_reads_as_protobuf(data)


def test_invalid_utf8_in_the_model_name_is_left_to_protobuf() -> None:
    data = b"\x0a\x02\xc3\x28" + pb.EncodeRequest(inputs=pb.FeatureInputs()).SerializeToString()
    assert read_encode_request(data) is None
    with pytest.raises(DecodeError):
        pb.EncodeRequest.FromString(data)


def test_a_shape_of_many_dimensions_is_left_to_protobuf() -> None:
    # A packed shape of a million dimensions: protobuf (in C) reads it, not a Python loop.
    dims = b"\x01" * 1_000_000
    array = b"\x0a" + _varint(len(dims)) + dims
    inputs = b"\x0a" + _varint(len(array)) + array
    data = b"\x1a" + _varint(len(inputs)) + inputs
    assert read_encode_request(data) is None
    assert len(pb.EncodeRequest.FromString(data).inputs.sequences[0].shape) == 1_000_000


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_token_and_text_inputs_are_left_to_protobuf() -> None:
    tokens = pb.EncodeRequest(model="m", tokens=pb.TokenInputs(sequences=[pb.TokenSequence()]))
    texts_ = pb.EncodeRequest(model="m", texts=pb.TextInputs(texts=["a"]))
    assert read_encode_request(tokens.SerializeToString()) is None
    assert read_encode_request(texts_.SerializeToString()) is None


@PROPERTY
@given(encode_requests(), st.none() | st.floats(0.001, 100.0))
def test_the_core_request_or_error_is_the_same_on_both_paths(
    message: pb.EncodeRequest, deadline_s: float | None
) -> None:
    raw = read_encode_request(message.SerializeToString())
    if raw is None:
        # Left to protobuf: only a sequence of more than two dimensions (refused either way).
        assert any(len(a.shape) > 2 for a in message.inputs.sequences)
        return
    try:
        expected = encode_request_from_proto(message, deadline_s)
    except errors.InvalidInput as exc:
        with pytest.raises(errors.InvalidInput) as refused:
            encode_request_from_raw(raw, deadline_s)
        assert (refused.value.field, refused.value.message) == (exc.field, exc.message)
        return
    got = encode_request_from_raw(raw, deadline_s)
    assert (got.model, got.kind, got.version, got.timeout_s, got.pooling) == (
        expected.model,
        expected.kind,
        expected.version,
        expected.timeout_s,
        expected.pooling,
    )
    assert len(got.sequences) == len(expected.sequences)
    for a, b in zip(got.sequences, expected.sequences, strict=True):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        assert a.dtype == np.float32 and a.flags.writeable
        assert same_floats(a, b)


@st.composite
def encode_results(draw: st.DrawFn) -> EncodeResult:
    """Pooled ([N, E]) or per-step (a list of [T, E]) encodings, with or without a head."""
    n = draw(st.integers(0, 4))
    size = draw(st.integers(0, 5))
    values = st.floats(width=32)
    encodings: np.ndarray | list[np.ndarray]
    if draw(st.booleans()):
        encodings = draw(hnp.arrays(np.float32, (n, size), elements=values))
    else:
        steps = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
        encodings = [draw(hnp.arrays(np.float32, (t, size), elements=values)) for t in steps]
    scores = labels = None
    if draw(st.booleans()):
        scores = draw(hnp.arrays(np.float32, (n, draw(st.integers(1, 3))), elements=values))
        if draw(st.booleans()):
            labels = draw(st.lists(texts, min_size=n, max_size=n))
    version = draw(st.integers(0, 2**32 - 1))
    return EncodeResult(draw(texts), version, encodings, scores, labels)


@PROPERTY
@given(encode_results())
def test_an_encode_answer_is_protobufs_bytes(result: EncodeResult) -> None:
    assert encode_response(result) == encode_result_to_proto(result).SerializeToString()


@st.composite
def v2_outputs(draw: st.DrawFn) -> V2Output:
    datatype = draw(st.sampled_from(["FP32", "INT64", "BYTES", "FP16", "BOOL"]))
    shape = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
    data: np.ndarray | list[bytes]
    if datatype == "BYTES":
        data = draw(st.lists(st.binary(max_size=5), max_size=3))
    else:
        dims = draw(st.lists(st.integers(0, 3), max_size=3))
        data = draw(hnp.arrays(V2_DTYPES[datatype].newbyteorder("="), tuple(dims)))
    return V2Output(draw(texts), datatype, data, shape)


@PROPERTY
@given(texts, st.integers(0, 2**40), texts, st.lists(v2_outputs(), max_size=3))
def test_an_infer_answer_is_protobufs_bytes(
    model: str, version: int, request_id: str, outputs: list[V2Output]
) -> None:
    request = v2.ModelInferRequest(model_name=model, id=request_id)
    expected = v2_infer_response(request, version, outputs).SerializeToString()
    assert infer_response(model, version, request_id, outputs) == expected
