"""The HTTP codecs: JSON ↔ numpy and the V2 binary extension (round trips, exact error fields)."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import InvalidInput
from service.http_api import json_codecs as codecs
from service.inference_protocol import tensors as v2_tensors

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def feature_batches(draw: st.DrawFn) -> list[list[list[float]]]:
    n = draw(st.integers(1, 4))
    width = draw(st.integers(1, 5))
    return [
        draw(st.lists(st.lists(finite32, min_size=width, max_size=width), min_size=1, max_size=6))
        for _ in range(n)
    ]


@settings(max_examples=60, deadline=None)
@given(feature_batches())
def test_features_round_trip(batch: list[list[list[float]]]) -> None:
    arrays = codecs.features_from_json(orjson.loads(orjson.dumps(batch)))
    assert [a.dtype for a in arrays] == [np.float32] * len(batch)
    for arr, seq in zip(arrays, batch, strict=True):
        assert arr.shape == (len(seq), len(seq[0]))
        np.testing.assert_array_equal(arr, np.asarray(seq, dtype=np.float32))
    back = orjson.loads(codecs.dumps(arrays))
    assert [[[np.float32(x) for x in s] for s in q] for q in back] == [
        [[np.float32(x) for x in s] for s in q] for q in batch
    ]


@settings(max_examples=60, deadline=None)
@given(feature_batches(), st.data())
def test_ragged_step_is_named(batch: list[list[list[float]]], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(batch) - 1))
    seq = batch[i]
    width = len(seq[0])
    t = data.draw(st.integers(0, len(seq) - 1))
    if t == 0:
        # A shorter first step makes every later step the odd one out; need a second step.
        seq.append(list(seq[0]))
        t = len(seq) - 1
    seq[t] = seq[t][:-1] if width > 1 else [*seq[t], 0.5]
    with pytest.raises(InvalidInput) as err:
        codecs.features_from_json(batch)
    assert err.value.field == f"inputs[{i}][{t}]"
    assert f"expected {width} features, got {len(seq[t])}" in str(err.value)


@pytest.mark.parametrize(
    ("value", "field", "fragment"),
    [
        ({"a": 1}, "inputs", "expected a list of sequences, got an object"),
        ([], "inputs", "at least 1 sequence"),
        ([[[1.0, 2.0]], [[1.0, "x"]]], "inputs[1][0][1]", "expected a number, got a string"),
        ([[[1.0], [None]]], "inputs[0][1][0]", "expected a number, got null"),
        ([[1.0, 2.0]], "inputs[0][0]", "expected a list of features, got a number"),
        ([[[[1.0]]]], "inputs[0][0][0]", "expected a number, got a list"),
        ([[]], "inputs[0]", "at least 1 step"),
        ([[[]]], "inputs[0][0]", "at least 1 feature"),
        ([[[1.0], [1e39]]], "inputs[0][1][0]", "float32 range"),
        ([[[True, False]]], "inputs[0][0][0]", "expected a number, got a boolean"),
    ],
)
def test_feature_errors_name_the_field(value: object, field: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as err:
        codecs.features_from_json(value)
    assert err.value.field == field
    assert fragment in err.value.message


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=8), min_size=1))
def test_tokens_round_trip(batch: list[list[int]]) -> None:
    arrays = codecs.tokens_from_json(orjson.loads(orjson.dumps(batch)))
    assert [a.tolist() for a in arrays] == batch
    assert all(a.dtype == np.int64 for a in arrays)


@pytest.mark.parametrize(
    ("value", "field", "fragment"),
    [
        ([[1, 2.5]], "tokens[0][1]", "expected an integer token id, got a number"),
        ([[1], [2, "3"]], "tokens[1][1]", "got a string"),
        ([[1], [[2]]], "tokens[1][0]", "got a list"),
        ([[1, 2**64]], "tokens[0][1]", "int64 range"),
        ([[]], "tokens[0]", "at least 1 token"),
        ([3], "tokens[0]", "expected a list of token ids, got a number"),
    ],
)
def test_token_errors_name_the_field(value: object, field: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as err:
        codecs.tokens_from_json(value)
    assert err.value.field == field
    assert fragment in err.value.message


def test_texts() -> None:
    assert codecs.texts_from_json(["a", "ü"]) == ["a", "ü"]
    with pytest.raises(InvalidInput) as err:
        codecs.texts_from_json(["a", 3])
    assert err.value.field == "texts[1]"


def test_invalid_json_names_body() -> None:
    with pytest.raises(InvalidInput) as err:
        codecs.loads(b'{"inputs": [NaN]}')
    assert err.value.field == "body"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=10))
def test_bytes_elements_round_trip(items: list[bytes]) -> None:
    packed = v2_tensors.pack_bytes(items)
    assert len(packed) == sum(4 + len(b) for b in items)
    assert v2_tensors.unpack_bytes(packed, "x") == items


def test_truncated_bytes_element_is_an_error() -> None:
    packed = v2_tensors.pack_bytes([b"abcd"])
    with pytest.raises(InvalidInput, match="claims 4 bytes"):
        v2_tensors.unpack_bytes(packed[:-1], "x")
    with pytest.raises(InvalidInput, match="truncated"):
        v2_tensors.unpack_bytes(packed + b"\x01", "x")


dtypes = st.sampled_from(["FP32", "INT64", "INT32", "FP64", "BOOL", "UINT8"])


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, list[int], np.ndarray]:
    datatype = draw(dtypes)
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    count = math.prod(shape)
    if datatype == "BOOL":
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    elif datatype[0] == "F":
        values = draw(st.lists(finite32, min_size=count, max_size=count))
    else:
        values = draw(st.lists(st.integers(0, 255), min_size=count, max_size=count))
    return datatype, shape, np.array(values, dtype=v2_tensors.V2_DTYPES[datatype]).reshape(shape)


@settings(max_examples=80, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.data())
def test_v2_request_round_trip_json_and_binary(
    specs: list[tuple[str, list[int], np.ndarray]], data: st.DataObject
) -> None:
    binary = [data.draw(st.booleans()) for _ in specs]
    inputs = []
    tail = b""
    for (datatype, shape, arr), as_binary in zip(specs, binary, strict=True):
        spec: dict[str, object] = {"name": f"T{len(inputs)}", "datatype": datatype, "shape": shape}
        if as_binary:
            blob = arr.tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            tail += blob
        else:
            spec["data"] = arr.reshape(-1).tolist()
        inputs.append(spec)
    head = orjson.dumps({"inputs": inputs})
    header_length = str(len(head)) if any(binary) else None
    header, rest = codecs.split_v2_body(head + tail, header_length)
    decoded = codecs.decode_v2_inputs(header, rest)
    for tensor, (datatype, shape, arr) in zip(decoded, specs, strict=True):
        assert tensor.datatype == datatype and tensor.shape == shape
        assert isinstance(tensor.data, np.ndarray)
        assert tensor.data.dtype == arr.dtype
        np.testing.assert_array_equal(tensor.data, arr)


@settings(max_examples=40, deadline=None)
@given(tensors(), st.booleans())
def test_v2_response_round_trip(spec: tuple[str, list[int], np.ndarray], binary: bool) -> None:
    datatype, shape, arr = spec
    texts = [b"ab", b"", "é".encode()]
    outputs = [
        v2_tensors.V2Output("OUT", datatype, arr, shape),
        v2_tensors.V2Output("TEXT", "BYTES", texts, [3]),
    ]
    body, header_length = codecs.encode_v2_response(
        {"model_name": "m"}, outputs, {"OUT", "TEXT"} if binary else set()
    )
    assert (header_length is not None) == binary
    header, tail = codecs.split_v2_body(body, None if header_length is None else str(header_length))
    # A response has the same tensor layout as a request, so the request decoder reads it.
    decoded = codecs.decode_v2_inputs({"inputs": header["outputs"]}, tail)
    assert isinstance(decoded[0].data, np.ndarray)
    np.testing.assert_array_equal(decoded[0].data, arr)
    assert decoded[1].data == texts


@pytest.mark.parametrize(
    ("header", "tail", "field", "fragment"),
    [
        ({"inputs": []}, b"", "inputs", "non-empty"),
        ({"inputs": [{"name": "A", "datatype": "F", "shape": [1]}]}, b"", "inputs[0].datatype", ""),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [2], "data": [1.0]}]},
            b"",
            "inputs[0].data",
            "holds 2 elements, got 1",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "INT64", "shape": [1], "data": [1.5]}]},
            b"",
            "inputs[0].data",
            "expected INT64",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [-1], "data": []}]},
            b"",
            "inputs[0].shape",
            "dimensions must be >= 0, got [-1]",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [1, "2"], "data": [1.0]}]},
            b"",
            "inputs[0].shape",
            "expected a list of integers",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [1] * 9, "data": [1.0]}]},
            b"",
            "inputs[0].shape",
            "at most 8 dimensions, got 9",
        ),
        # An empty tensor whose other dimensions numpy cannot shape (it used to be a 500).
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [0, 2**62, 4], "data": []}]},
            b"",
            "inputs[0].shape",
            "the non-zero dimensions must multiply to at most 2147483648, "
            "got [0, 4611686018427387904, 4]",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [0, 2**62, 4],
                        "parameters": {"binary_data_size": 0},
                    }
                ]
            },
            b"",
            "inputs[0].shape",
            "at most 2147483648",
        ),
        # Integers their datatype cannot hold are refused, never wrapped around (300 → 44).
        (
            {"inputs": [{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, 300]}]},
            b"",
            "inputs[0].data[1]",
            "300 is outside the UINT8 range [0, 255]",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "INT8", "shape": [1, 1], "data": [[-129]]}]},
            b"",
            "inputs[0].data[0]",
            "-129 is outside the INT8 range [-128, 127]",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "INT64", "shape": [1], "data": [2**63]}]},
            b"",
            "inputs[0].data[0]",
            "9223372036854775808 is outside the INT64 range",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "UINT64", "shape": [1], "data": [-1]}]},
            b"",
            "inputs[0].data[0]",
            "-1 is outside the UINT64 range [0, 18446744073709551615]",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\0\0\0\0",
            "inputs[0].parameters.binary_data_size",
            "needs 8 bytes, got 4",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\0\0\0\0",
            "inputs[0].parameters.binary_data_size",
            "only 4 left",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            b"\0",
            "body",
            "not claimed",
        ),
    ],
)
def test_v2_errors_name_the_field(
    header: dict[str, object], tail: bytes, field: str, fragment: str
) -> None:
    # Data is decoded on first use (after the model's checks of names and shapes).
    with pytest.raises(InvalidInput) as err:
        for tensor in codecs.decode_v2_inputs(header, tail):
            assert tensor.data is not None
    assert err.value.field == field
    assert fragment in err.value.message


@pytest.mark.parametrize(
    "datatype", ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
)
def test_v2_json_integers_at_their_datatype_limits_decode_exactly(datatype: str) -> None:
    info = np.iinfo(v2_tensors.V2_DTYPES[datatype])
    for value in (int(info.min), int(info.max)):
        header = {"inputs": [{"name": "A", "datatype": datatype, "shape": [1], "data": [value]}]}
        (tensor,) = codecs.decode_v2_inputs(header, b"")
        assert isinstance(tensor.data, np.ndarray)
        assert tensor.data.dtype == v2_tensors.V2_DTYPES[datatype] and tensor.data.tolist() == [
            value
        ]


def test_v2_json_floats_out_of_fp16_range_stay_infinite() -> None:
    # NOTE: as before: the engine refuses them (features must be finite), naming the step.
    header = {"inputs": [{"name": "A", "datatype": "FP16", "shape": [2], "data": [70000, 1.5]}]}
    (tensor,) = codecs.decode_v2_inputs(header, b"")
    assert isinstance(tensor.data, np.ndarray)
    assert tensor.data.tolist() == [float("inf"), 1.5]


def test_v2_header_length_is_checked() -> None:
    with pytest.raises(InvalidInput) as err:
        codecs.split_v2_body(b"{}", "99")
    assert err.value.field == codecs.HEADER_LENGTH
