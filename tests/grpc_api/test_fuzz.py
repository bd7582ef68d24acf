"""Property-based fuzz of the gRPC front-end: bad input never yields INTERNAL or UNKNOWN.

Hypothesis generates type-valid but otherwise arbitrary protobuf messages for every RPC of
`rnnserve.v1.RnnServe` and `inference.GRPCInferenceService` (odd and unknown model names, shapes
with zeros, negatives and huge values, valid and invalid datatypes, raw contents of the wrong
length, NaN and infinite floats, empty and over-limit batches, huge max_length / beam_size /
timeout_ms, random parameter maps, token ids out of range, invalid UTF-8 in BYTES tensors, random
state tokens, short random message sequences on the streaming RPCs) and sends them to a real
grpc.aio server on a loopback port, over real checkpoints.

What it proves, per call: the status is OK or one of the client-error codes that the core's error
table (service/grpc_api/convert.py GRPC_STATUS, DESIGN.md §4) allows for that RPC — never INTERNAL
or UNKNOWN; DEADLINE_EXCEEDED only when the request asked for a tiny timeout; details never carry a
stack trace; INVALID_ARGUMENT details start with the field they are about (`inputs[0].shape: …`).
ModelStreamInfer reports failures inline: there no answer may carry the server's "internal error" or
a stack trace, and every request gets its answer. After the fuzz, a valid request to every service
still succeeds.

The server bugs the fuzz found are pinned, fixed, by the explicit tests at the end: each asserts
the refusal a client now gets (status and the field named). A new finding is pinned there the same
way, first as a strict xfail.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.grpc_api.server import create_grpc_server
from service.inference_protocol.tensors import V2_DTYPES, pack_bytes
from tests.factories import CHARS, TOKENS_VOCAB_SIZE, write_model
from tests.support import Served

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")
Code = grpc.StatusCode

FEATURES = 4
LABELS = ["neg", "pos", "neutral"]
TOKEN = "fuzz-s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_SEQUENCES = 8
MAX_TEXT_LENGTH = 40
MAX_MESSAGE_BYTES = 64 * 1024
MAX_STEPS = 2048  # the models' serving.max_sequence_length (the config default)
DECODE_MAX_LENGTH = 6
CALL_TIMEOUT_S = 30.0
# A request's own timeout at most this long may legitimately end in DEADLINE_EXCEEDED.
TINY_TIMEOUT_MS = 100

# enc: features + labelled head (streamable); tok: tokens, bidirectional (not streamable);
# txt: text encoder with an unlabelled head (streamable); s2s: seq2seq over text.
SERVED = ("enc", "tok", "txt", "s2s")
# Management with the right token only ever touches this model (or names that serve nothing),
# so the served models stay READY and every other answer stays meaningful.
SPARE = "spare"

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the server --------------------------------------------------------------------------------


@dataclass
class FuzzServer:
    channel: grpc.Channel
    api: pb_grpc.RnnServeStub
    v2: v2_grpc.GRPCInferenceServiceStub
    # A genuine state token of "enc" version 1 (for resumed and tampered sessions).
    state_token: bytes


def _repository(root: Path) -> Path:
    write_model(root, "enc", input_type="features", input_size=FEATURES, head=LABELS, seed=1)
    write_model(root, "tok", input_type="tokens", cell="gru", bidirectional=True, seed=2)
    write_model(root, "txt", input_type="text", cell="rnn", head=3, pooling="mean", seed=3)
    write_model(
        root,
        "s2s",
        task="seq2seq",
        input_type="text",
        cell="gru",
        attention=True,
        max_length=DECODE_MAX_LENGTH,
        seed=4,
    )
    write_model(root, SPARE, input_type="features", input_size=FEATURES, hidden_size=8, seed=5)
    return root


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    # NOTE: the engine and server live on their own loop in a thread (tests.test_sessions.Served),
    # so that Hypothesis drives a plain synchronous client (it does not run async test functions).
    served = Served(
        _repository(tmp_path_factory.mktemp("grpc-fuzz")),
        host="127.0.0.1",
        grpc_port=0,
        management_enabled=True,
        management_token=TOKEN,
        drain_grace_s=1.0,
        max_sequences_per_request=MAX_SEQUENCES,
        max_text_length=MAX_TEXT_LENGTH,
        grpc_max_message_bytes=MAX_MESSAGE_BYTES,
    )
    server = create_grpc_server(served.engine, served.engine.settings, served.metrics)
    port = served.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    api = pb_grpc.RnnServeStub(channel)
    chunk = pb.SessionChunk(inputs=pb.FloatArray(shape=[2, FEATURES], values=[0.5] * 2 * FEATURES))
    token = api.StreamChunk(pb.StreamChunkRequest(model="enc", chunk=chunk)).state_token
    try:
        yield FuzzServer(channel, api, v2_grpc.GRPCInferenceServiceStub(channel), token)
    finally:
        channel.close()
        served.run(server.stop(0))
        served.close()


# --- the property ------------------------------------------------------------------------------

# Codes each family of RPCs may answer, from the error table (service/grpc_api/convert.py): the core
# errors those handlers can raise, plus RESOURCE_EXHAUSTED from gRPC's own message-size limit
# wherever a request or answer can be large.
INFERENCE = frozenset(
    {
        Code.INVALID_ARGUMENT,  # InvalidInput
        Code.NOT_FOUND,  # NotFound: unknown model or version
        Code.UNAVAILABLE,  # NotReady / Draining
        Code.RESOURCE_EXHAUSTED,  # Overloaded (full queue) or an over-limit message
    }
)
SESSIONS = INFERENCE | {Code.FAILED_PRECONDITION}  # Conflict: a chunk while one is running
MODEL_LOOKUP = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAVAILABLE})
MANAGEMENT = frozenset(
    {
        Code.PERMISSION_DENIED,
        Code.UNAUTHENTICATED,
        Code.INVALID_ARGUMENT,  # an invalid model name
        Code.NOT_FOUND,  # nothing on disk / not loaded
        Code.UNAVAILABLE,  # the load failed
        Code.FAILED_PRECONDITION,  # a load already running
    }
)
NONE: frozenset[Code] = frozenset()

# "field: message", where field is a wire name such as inputs[0].shape or parameters.timeout_ms.
FIELD_FIRST = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\[\]]*: \S")
INTERNAL_MESSAGE = "internal error"


# What was sent: one message, or a stream's messages.
Sent = Message | list[Message]


def describe(sent: Sent) -> str:
    """The request(s) as protobuf text, shortened (for failure messages)."""
    messages = sent if isinstance(sent, list) else [sent]
    text = "\n".join(text_format.MessageToString(m, as_utf8=True) for m in messages)
    return text if len(text) <= 2000 else text[:2000] + " …"


def check(
    rpc: str,
    sent: Sent,
    code: Code,
    details: str,
    allowed: frozenset[Code],
    tiny_timeout: bool = False,
) -> None:
    """Assert the product rule for one answer (`allowed` excludes OK: OK is always fine)."""
    permitted = allowed | {Code.OK} | ({Code.DEADLINE_EXCEEDED} if tiny_timeout else NONE)
    assert code in permitted, f"{rpc} answered {code.name} {details!r}\nsent: {describe(sent)}"
    assert "Traceback" not in details and 'File "' not in details, f"{rpc}: {details!r}"
    if code == Code.INVALID_ARGUMENT:
        assert FIELD_FIRST.match(details), f"{rpc}: {details!r} names no field\n{describe(sent)}"


def outcome(call: Callable[[], object]) -> tuple[Code, str]:
    """The status code and details of a unary call."""
    try:
        call()
    except grpc.RpcError as exc:
        error = cast(grpc.Call, exc)
        return error.code(), error.details() or ""
    return Code.OK, ""


def stream_outcome(responses: Iterable[T]) -> tuple[Code, str, list[T]]:
    """The status, details and every message of a server-streamed call."""
    received: list[T] = []
    try:
        for response in responses:
            received.append(response)
    except grpc.RpcError as exc:
        error = cast(grpc.Call, exc)
        return error.code(), error.details() or "", received
    return Code.OK, "", received


def tiny(timeout_ms: int) -> bool:
    return 0 < timeout_ms <= TINY_TIMEOUT_MS


# --- strategies: shared pieces -----------------------------------------------------------------

# NOTE: every field is drawn "mostly valid, one time in ODDS anything": a request then has only
# one or two bad fields, so the fuzz reaches the engine's deeper checks, its batches, decoders and
# answers (a request with every field random never gets past the first check).
ODDS = 8


def rarely(draw: st.DrawFn, odds: int = ODDS) -> bool:
    """True one time in `odds` (False is the simpler example: Hypothesis shrinks toward valid)."""
    return draw(st.integers(0, odds - 1)) == odds - 1


def mostly(draw: st.DrawFn, valid: st.SearchStrategy[T], anything: st.SearchStrategy[T]) -> T:
    return draw(anything) if rarely(draw) else draw(valid)


ODD_NAMES = st.sampled_from(
    ["", "nope", "ENC", "enc ", " enc", "../enc", "enc/1", ".", "..", "a" * 300, "\x00", "é", "🙂"]
)
MODEL_NAMES = st.one_of(st.sampled_from([*SERVED, SPARE]), ODD_NAMES, st.text(max_size=10))
UINT32 = st.one_of(
    st.sampled_from([0, 1, 2, 3, 2**31, 2**32 - 1]), st.integers(min_value=0, max_value=2**32 - 1)
)
VERSIONS = st.sampled_from([None, 1, 0, 2, 2**32 - 1])
GOOD_VERSIONS = st.sampled_from([None, 1])
TIMEOUTS_MS = st.sampled_from([0, 1, 5, TINY_TIMEOUT_MS, 60_000, 3_600_000, 3_600_001, 2**32 - 1])
GOOD_TIMEOUTS_MS = st.sampled_from([0, 60_000])
POOLINGS = st.one_of(
    st.sampled_from(["", "last", "mean", "max", "none", "avg", "LAST", " last"]),
    st.text(max_size=5),
)
GOOD_POOLINGS = st.sampled_from(["", "last", "mean", "max", "none"])
GOOD_FLOATS = st.floats(min_value=-3.0, max_value=3.0, width=32)
FLOATS = st.one_of(GOOD_FLOATS, st.floats(width=32))  # + NaN, ±inf, huge and subnormal
GOOD_TOKEN_IDS = st.integers(min_value=0, max_value=TOKENS_VOCAB_SIZE - 1)
TOKEN_IDS = st.one_of(
    GOOD_TOKEN_IDS,
    st.sampled_from([-1, TOKENS_VOCAB_SIZE, 2**31, -(2**63), 2**63 - 1]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
GOOD_TEXTS = st.text(alphabet=CHARS, min_size=1, max_size=12)
TEXTS = st.one_of(
    GOOD_TEXTS,
    st.text(max_size=12),
    st.sampled_from(["", "a" * MAX_TEXT_LENGTH, "a" * (MAX_TEXT_LENGTH + 1), "\x00", "🙂" * 3]),
)
# Steps of one sequence: empty, small, at and over the models' limit.
GOOD_STEPS = st.integers(1, 5)
STEPS = st.sampled_from([0, 1, 2, 5, MAX_STEPS, MAX_STEPS + 1])
# Sequences in one request: empty, small, at and over the server's limit.
GOOD_COUNTS = st.integers(1, 3)
COUNTS = st.sampled_from([0, 1, 2, MAX_SEQUENCES, MAX_SEQUENCES + 1])
# At most this many numbers are drawn one by one; longer lists repeat a few drawn ones.
DRAWN = 12


def values(draw: st.DrawFn, elements: st.SearchStrategy[T], count: int) -> list[T]:
    if count <= DRAWN:
        return draw(st.lists(elements, min_size=count, max_size=count))
    head = draw(st.lists(elements, min_size=1, max_size=3))
    return (head * (count // len(head) + 1))[:count]


def float_array(draw: st.DrawFn) -> pb.FloatArray:
    """A [time, features] sequence: shape, value count and values each sometimes wrong."""
    shape = mostly(
        draw,
        st.tuples(GOOD_STEPS, st.just(FEATURES)).map(list),
        st.one_of(
            st.tuples(STEPS, st.sampled_from([FEATURES, 1, 0, FEATURES + 1])).map(list),
            st.lists(UINT32, max_size=3),
        ),
    )
    needed = math.prod(shape)
    count = needed
    if needed > FEATURES * (MAX_STEPS + 1) or rarely(draw):
        count = draw(st.integers(0, 9))
    elements = mostly(draw, st.just(GOOD_FLOATS), st.just(FLOATS))
    return pb.FloatArray(shape=shape, values=values(draw, elements, count))


def token_sequence(draw: st.DrawFn) -> pb.TokenSequence:
    elements = mostly(draw, st.just(GOOD_TOKEN_IDS), st.just(TOKEN_IDS))
    return pb.TokenSequence(ids=values(draw, elements, mostly(draw, GOOD_STEPS, STEPS)))


def text(draw: st.DrawFn) -> str:
    return mostly(draw, GOOD_TEXTS, TEXTS)


# The input field each model reads (rnnserve.v1 oneof names).
INPUT_OF = {"enc": "inputs", "tok": "tokens", "txt": "texts", "s2s": "texts", SPARE: "inputs"}
INPUT_KINDS = st.sampled_from(["inputs", "tokens", "texts", None])


def fill_inputs(
    draw: st.DrawFn, message: pb.EncodeRequest | pb.GenerateRequest, model: str
) -> None:
    """Set one of inputs / tokens / texts (or none) with a random number of sequences."""
    kind = mostly(draw, st.just(INPUT_OF.get(model, "inputs")), INPUT_KINDS)
    count = mostly(draw, GOOD_COUNTS, COUNTS)
    if kind == "inputs":
        message.inputs.SetInParent()
        for _ in range(count):
            message.inputs.sequences.append(float_array(draw))
    elif kind == "tokens":
        message.tokens.SetInParent()
        for _ in range(count):
            message.tokens.sequences.append(token_sequence(draw))
    elif kind == "texts":
        message.texts.SetInParent()
        message.texts.texts.extend(text(draw) for _ in range(count))


def model_name(draw: st.DrawFn, models: tuple[str, ...]) -> tuple[str, str]:
    """(the model the request is shaped for, the name it is sent to: sometimes anything)."""
    model = draw(st.sampled_from(models))
    return model, mostly(draw, st.just(model), MODEL_NAMES)


# --- rnnserve.v1: Encode, Generate, GenerateStream ---------------------------------------------


@st.composite
def encode_requests(draw: st.DrawFn) -> pb.EncodeRequest:
    model, name = model_name(draw, ("enc", "tok", "txt"))
    message = pb.EncodeRequest(
        model=name,
        version=mostly(draw, GOOD_VERSIONS, VERSIONS),
        pooling=mostly(draw, GOOD_POOLINGS, POOLINGS),
        timeout_ms=mostly(draw, GOOD_TIMEOUTS_MS, TIMEOUTS_MS),
    )
    fill_inputs(draw, message, model)
    return message


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    model, name = model_name(draw, ("s2s",))
    message = pb.GenerateRequest(
        model=name,
        version=mostly(draw, GOOD_VERSIONS, VERSIONS),
        max_length=mostly(draw, st.integers(0, DECODE_MAX_LENGTH), UINT32),
        beam_size=mostly(draw, st.integers(0, 4), st.one_of(st.sampled_from([16, 17]), UINT32)),
        timeout_ms=mostly(draw, GOOD_TIMEOUTS_MS, TIMEOUTS_MS),
    )
    fill_inputs(draw, message, model)
    return message


@FUZZ
@given(request=encode_requests())
def test_encode(fuzz: FuzzServer, request: pb.EncodeRequest) -> None:
    code, details = outcome(lambda: fuzz.api.Encode(request, timeout=CALL_TIMEOUT_S))
    check("Encode", request, code, details, INFERENCE, tiny(request.timeout_ms))


@FUZZ
@given(request=generate_requests())
def test_generate_and_generate_stream(fuzz: FuzzServer, request: pb.GenerateRequest) -> None:
    code, details = outcome(lambda: fuzz.api.Generate(request, timeout=CALL_TIMEOUT_S))
    check("Generate", request, code, details, INFERENCE, tiny(request.timeout_ms))

    code, details, events = stream_outcome(fuzz.api.GenerateStream(request, timeout=CALL_TIMEOUT_S))
    check("GenerateStream", request, code, details, INFERENCE, tiny(request.timeout_ms))
    if code == Code.OK:
        kinds = [event.WhichOneof("event") for event in events]
        assert kinds and kinds[-1] == "result" and kinds.count("result") == 1, kinds


# --- rnnserve.v1: sessions -----------------------------------------------------------------------

# How a fuzzed state token is made from the server's genuine one (known only at run time).
TokenRecipe = tuple[str, int, bytes]
NO_TOKEN: st.SearchStrategy[TokenRecipe] = st.just(("none", 0, b""))
TOKEN_RECIPES: st.SearchStrategy[TokenRecipe] = st.one_of(
    st.tuples(st.just("genuine"), st.just(0), st.just(b"")),
    st.tuples(st.just("random"), st.just(0), st.binary(max_size=48)),
    st.tuples(
        st.sampled_from(["truncated", "flipped", "extended"]),
        st.integers(0, 10_000),
        st.binary(min_size=1, max_size=4),
    ),
    st.tuples(st.just("format"), st.integers(0, 255), st.just(b"")),
)


def make_token(genuine: bytes, recipe: TokenRecipe) -> bytes:
    kind, index, data = recipe
    if kind == "none":
        return b""
    if kind == "genuine":
        return genuine
    if kind == "random":
        return data
    at = index % len(genuine)
    if kind == "truncated":
        return genuine[:at]
    if kind == "flipped":
        return genuine[:at] + bytes([genuine[at] ^ (data[0] or 1)]) + genuine[at + 1 :]
    if kind == "extended":
        return genuine + data
    return bytes([index]) + genuine[1:]  # "format": another format byte


STREAMABLE = ("enc", "txt")
CHUNK_KINDS = st.sampled_from(["inputs", "tokens", "text", None])


def session_chunk(draw: st.DrawFn, model: str) -> pb.SessionChunk:
    chunk = pb.SessionChunk(timeout_ms=mostly(draw, GOOD_TIMEOUTS_MS, TIMEOUTS_MS))
    kind = mostly(draw, st.just("inputs" if model == "enc" else "text"), CHUNK_KINDS)
    if kind == "inputs":
        chunk.inputs.CopyFrom(float_array(draw))
    elif kind == "tokens":
        chunk.tokens.CopyFrom(token_sequence(draw))
    elif kind == "text":
        chunk.text = text(draw)
    return chunk


@st.composite
def session_scripts(draw: st.DrawFn) -> list[tuple[pb.SessionRequest, TokenRecipe]]:
    """One StreamSession: mostly open, then chunks; sometimes out of order, repeated or empty."""
    model, name = model_name(draw, STREAMABLE)

    def opening() -> tuple[pb.SessionRequest, TokenRecipe]:
        message = pb.SessionOpen(
            model=name,
            version=mostly(draw, GOOD_VERSIONS, VERSIONS),
            pooling=mostly(draw, GOOD_POOLINGS, POOLINGS),
            return_state=draw(st.booleans()),
        )
        return pb.SessionRequest(open=message), mostly(draw, NO_TOKEN, TOKEN_RECIPES)

    def chunk() -> tuple[pb.SessionRequest, TokenRecipe]:
        return pb.SessionRequest(chunk=session_chunk(draw, model)), ("none", 0, b"")

    script = [] if rarely(draw) else [opening()]
    for _ in range(draw(st.integers(0, 3))):
        script.append(opening() if rarely(draw, ODDS * 2) else chunk())
    return script


@FUZZ
@given(script=session_scripts())
def test_stream_session(
    fuzz: FuzzServer, script: list[tuple[pb.SessionRequest, TokenRecipe]]
) -> None:
    requests: list[pb.SessionRequest] = []
    for request, recipe in script:
        if request.HasField("open"):
            request.open.state_token = make_token(fuzz.state_token, recipe)
        requests.append(request)
    code, details, replies = stream_outcome(
        fuzz.api.StreamSession(iter(requests), timeout=CALL_TIMEOUT_S)
    )
    tiny_timeout = any(tiny(r.chunk.timeout_ms) for r in requests if r.HasField("chunk"))
    sent = cast(list[Message], requests)
    check("StreamSession", sent, code, details, SESSIONS, tiny_timeout)
    if code == Code.OK:
        # Every message answered, in order: "opened", then one result per chunk.
        assert len(replies) == len(requests), (len(replies), describe(sent))
        events = [r.WhichOneof("event") for r in replies]
        assert events == ["opened", *["chunk"] * (len(events) - 1)][: len(events)], events


@st.composite
def stream_chunk_requests(draw: st.DrawFn) -> tuple[pb.StreamChunkRequest, TokenRecipe]:
    model, name = model_name(draw, STREAMABLE)
    message = pb.StreamChunkRequest(
        model=name,
        version=mostly(draw, GOOD_VERSIONS, VERSIONS),
        pooling=mostly(draw, GOOD_POOLINGS, POOLINGS),
    )
    if not rarely(draw, ODDS * 2):  # else: no chunk at all
        message.chunk.CopyFrom(session_chunk(draw, model))
    genuine = st.just(("genuine", 0, b"")) if model == "enc" else NO_TOKEN
    return message, mostly(draw, st.one_of(NO_TOKEN, genuine), TOKEN_RECIPES)


@FUZZ
@given(drawn=stream_chunk_requests())
def test_stream_chunk(fuzz: FuzzServer, drawn: tuple[pb.StreamChunkRequest, TokenRecipe]) -> None:
    request, recipe = drawn
    request.state_token = make_token(fuzz.state_token, recipe)
    code, details = outcome(lambda: fuzz.api.StreamChunk(request, timeout=CALL_TIMEOUT_S))
    check("StreamChunk", request, code, details, INFERENCE, tiny(request.chunk.timeout_ms))


# --- model listing and metadata (both services) ------------------------------------------------

V2_VERSIONS = st.one_of(
    st.sampled_from(["", "1", "2", "0", "-1", "01", "1.0", " 1", "99999999999999999999", "²"]),
    st.text(max_size=4),
)


@FUZZ
@given(name=MODEL_NAMES, version=V2_VERSIONS, ready_only=st.booleans())
def test_model_listing_and_metadata(
    fuzz: FuzzServer, name: str, version: str, ready_only: bool
) -> None:
    calls: list[tuple[str, Message, Callable[[], object], frozenset[Code]]] = []
    listed = pb.ListModelsRequest()
    calls.append(("ListModels", listed, lambda: fuzz.api.ListModels(listed), NONE))
    get = pb.GetModelRequest(name=name)
    calls.append(("GetModel", get, lambda: fuzz.api.GetModel(get), MODEL_LOOKUP))
    ready = v2.ModelReadyRequest(name=name, version=version)
    calls.append(("ModelReady", ready, lambda: fuzz.v2.ModelReady(ready), MODEL_LOOKUP))
    meta = v2.ModelMetadataRequest(name=name, version=version)
    calls.append(("ModelMetadata", meta, lambda: fuzz.v2.ModelMetadata(meta), MODEL_LOOKUP))
    index = v2.RepositoryIndexRequest(repository_name=name, ready=ready_only)
    calls.append(
        ("RepositoryIndex", index, lambda: fuzz.v2.RepositoryIndex(index, metadata=AUTH), NONE)
    )
    live, server_ready = v2.ServerLiveRequest(), v2.ServerReadyRequest()
    calls.append(("ServerLive", live, lambda: fuzz.v2.ServerLive(live), NONE))
    calls.append(("ServerReady", server_ready, lambda: fuzz.v2.ServerReady(server_ready), NONE))
    server_meta = v2.ServerMetadataRequest()
    calls.append(("ServerMetadata", server_meta, lambda: fuzz.v2.ServerMetadata(server_meta), NONE))
    for rpc, request, call, allowed in calls:
        code, details = outcome(call)
        check(rpc, request, code, details, allowed)


# --- management (both services) ----------------------------------------------------------------

# With the right token only the spare model and names that serve nothing; without it, anything.
UNSERVED_NAMES = st.one_of(st.just(SPARE), ODD_NAMES, st.text(max_size=10)).filter(
    lambda name: name not in SERVED
)
# The scheme in any case, spaces around the token (RFC 7235), as REST takes it.
RIGHT = (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ")
WRONG_AUTH = st.sampled_from(["", "Bearer", "Bearer ", f"Basic {TOKEN}", TOKEN, "Bearer x"])
REPOSITORY_PARAMETERS = st.dictionaries(
    st.text(max_size=6),
    st.one_of(
        st.builds(v2.ModelRepositoryParameter, bool_param=st.booleans()),
        st.builds(v2.ModelRepositoryParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
        st.builds(v2.ModelRepositoryParameter, string_param=st.text(max_size=6)),
        st.builds(v2.ModelRepositoryParameter, bytes_param=st.binary(max_size=6)),
    ),
    max_size=2,
)
V1_MANAGEMENT = ("LoadModel", "UnloadModel", "ReloadModel")
V2_MANAGEMENT = ("RepositoryModelLoad", "RepositoryModelUnload")
Metadata = tuple[tuple[str, str], ...]


@st.composite
def management_calls(draw: st.DrawFn) -> tuple[str, Message, Metadata]:
    metadata: Metadata = (("authorization", draw(st.sampled_from(RIGHT))),)
    if draw(st.booleans()):
        name = draw(UNSERVED_NAMES)
    else:
        wrong = draw(WRONG_AUTH)
        metadata = (("authorization", wrong),) if wrong else ()
        name = draw(MODEL_NAMES)
    rpc = draw(st.sampled_from([*V1_MANAGEMENT, *V2_MANAGEMENT]))
    request: Message
    if rpc == "LoadModel":
        request = pb.LoadModelRequest(name=name, version=draw(VERSIONS))
    elif rpc == "UnloadModel":
        request = pb.UnloadModelRequest(name=name, version=draw(VERSIONS))
    elif rpc == "ReloadModel":
        request = pb.ReloadModelRequest(name=name)
    elif rpc == "RepositoryModelLoad":
        request = v2.RepositoryModelLoadRequest(
            repository_name=draw(st.text(max_size=4)),
            model_name=name,
            parameters=draw(REPOSITORY_PARAMETERS),
        )
    else:
        request = v2.RepositoryModelUnloadRequest(
            repository_name=draw(st.text(max_size=4)),
            model_name=name,
            parameters=draw(REPOSITORY_PARAMETERS),
        )
    return rpc, request, metadata


@FUZZ
@given(drawn=management_calls())
def test_management(fuzz: FuzzServer, drawn: tuple[str, Message, Metadata]) -> None:
    rpc, request, metadata = drawn
    stub: Any = fuzz.api if rpc in V1_MANAGEMENT else fuzz.v2
    method = getattr(stub, rpc)
    code, details = outcome(lambda: method(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
    check(rpc, request, code, details, MANAGEMENT)
    if not metadata or metadata[0][1] not in RIGHT:
        assert code == Code.UNAUTHENTICATED, (rpc, code, details)


# --- Open Inference Protocol: ModelInfer, ModelStreamInfer --------------------------------------

DATATYPES = st.one_of(
    st.sampled_from([*V2_DTYPES, "BYTES"]),
    st.sampled_from(["", "BF16", "fp32", "STRING", "INT128"]),
)
TENSOR_NAMES = st.sampled_from(["INPUT", "TOKENS", "TEXT", "LENGTHS", "OUTPUT", "ENCODING", ""])
OUTPUT_NAMES = st.sampled_from(
    ["ENCODING", "SCORES", "LABELS", "OUTPUT_TOKENS", "OUTPUT_LENGTHS", "OUTPUT_TEXT", "", "X"]
)
INT64_DIMS = st.sampled_from([0, 1, 2, FEATURES, -1, MAX_STEPS + 1, 2**31, 2**62, 2**63 - 1])
INFER_PARAMETER = st.one_of(
    st.builds(v2.InferParameter, bool_param=st.booleans()),
    st.builds(
        v2.InferParameter,
        int64_param=st.one_of(
            st.sampled_from([0, 1, 2, 4, 5, 17, TINY_TIMEOUT_MS, 60_000, 3_600_001]),
            st.integers(-(2**63), 2**63 - 1),
        ),
    ),
    st.builds(v2.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
    st.builds(v2.InferParameter, double_param=st.floats()),
    st.builds(v2.InferParameter, string_param=POOLINGS),
)
INFER_PARAMETERS = st.dictionaries(
    st.one_of(
        st.sampled_from(["timeout_ms", "pooling", "max_length", "beam_size"]), st.text(max_size=4)
    ),
    INFER_PARAMETER,
    max_size=3,
)
# Parameters each model takes as they should be sent (or none).
GOOD_PARAMETERS = {
    "encode": st.fixed_dictionaries(
        {},
        optional={
            "pooling": st.builds(v2.InferParameter, string_param=st.sampled_from(["last", "none"])),
            "timeout_ms": st.builds(v2.InferParameter, int64_param=st.just(60_000)),
        },
    ),
    "seq2seq": st.fixed_dictionaries(
        {},
        optional={
            "max_length": st.builds(
                v2.InferParameter, int64_param=st.integers(1, DECODE_MAX_LENGTH)
            ),
            "beam_size": st.builds(v2.InferParameter, int64_param=st.integers(1, 4)),
        },
    ),
}
# Elements per typed-contents field, and how each datatype's elements look in raw bytes.
CONTENT_ELEMENTS: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": TOKEN_IDS,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": FLOATS,
    "fp64_contents": st.floats(),
    "bytes_contents": st.one_of(TEXTS.map(str.encode), st.binary(max_size=8)),
}
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
RAW_FORMAT: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "BOOL": ("?", st.booleans()),
    "INT8": ("b", st.integers(-128, 127)),
    "INT16": ("h", st.integers(-(2**15), 2**15 - 1)),
    "INT32": ("i", st.integers(-(2**31), 2**31 - 1)),
    "INT64": ("q", TOKEN_IDS),
    "UINT8": ("B", st.integers(0, 255)),
    "UINT16": ("H", st.integers(0, 2**16 - 1)),
    "UINT32": ("I", st.integers(0, 2**32 - 1)),
    "UINT64": ("Q", st.integers(0, 2**64 - 1)),
    "FP16": ("e", st.floats(width=16)),
    "FP32": ("f", FLOATS),
    "FP64": ("d", st.floats()),
}
MAX_ELEMENTS = MAX_SEQUENCES * FEATURES * (MAX_STEPS + 1)
# The main input of each model: its name, datatype and the elements a valid one holds.
MAIN_INPUT: dict[str, tuple[str, str, st.SearchStrategy[Any]]] = {
    "enc": ("INPUT", "FP32", GOOD_FLOATS),
    "tok": ("TOKENS", "INT64", GOOD_TOKEN_IDS),
    "txt": ("TEXT", "BYTES", GOOD_TEXTS.map(str.encode)),
    "s2s": ("TEXT", "BYTES", GOOD_TEXTS.map(str.encode)),
}


@dataclass
class DrawnTensor:
    tensor: v2.ModelInferRequest.InferInputTensor
    count: int  # elements its contents hold (the shape's product, unless drawn wrong)
    elements: st.SearchStrategy[Any] | None  # None: any value of its contents field


def main_tensor(draw: st.DrawFn, model: str) -> DrawnTensor:
    """The model's input tensor: name, datatype, each dimension and the values sometimes wrong."""
    name, expected, good = MAIN_INPUT[model]
    name = mostly(draw, st.just(name), TENSOR_NAMES)
    datatype = mostly(draw, st.just(expected), DATATYPES)
    batch = mostly(draw, GOOD_COUNTS, COUNTS)
    steps = mostly(draw, GOOD_STEPS, STEPS)
    shape = {"enc": [batch, steps, FEATURES], "tok": [batch, steps]}.get(model, [batch])
    shape = [mostly(draw, st.just(d), INT64_DIMS) for d in shape]
    if rarely(draw, ODDS * 2):
        shape = draw(st.lists(INT64_DIMS, max_size=4))
    tensor = v2.ModelInferRequest.InferInputTensor(
        name=name,
        datatype=datatype,
        shape=shape,
        parameters=mostly(draw, st.just({}), INFER_PARAMETERS),
    )
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if not 0 <= count <= MAX_ELEMENTS or rarely(draw, ODDS * 2):
        count = draw(st.integers(0, 6))
    valid_values = datatype == expected and not rarely(draw)
    return DrawnTensor(tensor, count, good if valid_values else None)


def lengths_tensor(draw: st.DrawFn, main: DrawnTensor) -> DrawnTensor:
    """LENGTHS for the main tensor: values in or around 1..time, its shape sometimes wrong."""
    shape = list(main.tensor.shape)
    batch = shape[0] if shape and 0 <= shape[0] <= MAX_SEQUENCES + 1 else 1
    steps = shape[1] if len(shape) > 1 and 0 <= shape[1] <= MAX_STEPS + 1 else 1
    datatype = mostly(draw, st.just("INT64"), st.sampled_from(["INT32", "UINT8", "FP32", "BYTES"]))
    lengths_shape = mostly(draw, st.just([batch]), st.sampled_from([[batch, 1], [batch + 1], []]))
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="LENGTHS", datatype=datatype, shape=lengths_shape
    )
    good = st.integers(min(1, steps), steps)
    elements = mostly(draw, st.just(good), st.just(st.integers(-1, steps + 1)))
    if datatype != "INT64":
        elements = None  # any value of that datatype
    return DrawnTensor(tensor, math.prod(lengths_shape), elements)


def raw_contents(draw: st.DrawFn, drawn: DrawnTensor) -> bytes:
    """Raw bytes for the tensor's elements, sometimes a few bytes short or long."""
    datatype, count = drawn.tensor.datatype, drawn.count
    if datatype == "BYTES":
        elements = CONTENT_ELEMENTS["bytes_contents"] if drawn.elements is None else drawn.elements
        data = pack_bytes(values(draw, elements, count))
    elif datatype in RAW_FORMAT:
        code, elements = RAW_FORMAT[datatype]
        elements = elements if drawn.elements is None else drawn.elements
        data = struct.pack(f"<{count}{code}", *values(draw, elements, count))
    else:
        data = draw(st.binary(max_size=16))
    cut = mostly(draw, st.just(0), st.sampled_from([-1, -4, 3, 4]))
    return data[:cut] if cut < 0 else data + b"\x01" * cut


def fill_typed(draw: st.DrawFn, drawn: DrawnTensor) -> None:
    """Typed contents: in the datatype's field, sometimes another one (then any values)."""
    field = TYPED_FIELD.get(drawn.tensor.datatype)
    elements = drawn.elements
    if field is None or rarely(draw, ODDS * 2):
        field = draw(st.sampled_from(list(CONTENT_ELEMENTS)))
        elements = None
    if elements is None:
        elements = CONTENT_ELEMENTS[field]
    getattr(drawn.tensor.contents, field).extend(values(draw, elements, drawn.count))


@st.composite
def infer_requests(draw: st.DrawFn) -> v2.ModelInferRequest:
    model, name = model_name(draw, tuple(MAIN_INPUT))
    task = "seq2seq" if model == "s2s" else "encode"
    request = v2.ModelInferRequest(
        model_name=name,
        model_version=mostly(draw, st.sampled_from(["", "1"]), V2_VERSIONS),
        id=draw(st.text(max_size=6)),
        parameters=mostly(draw, GOOD_PARAMETERS[task], INFER_PARAMETERS),
    )
    main = main_tensor(draw, model)
    tensors = [main]
    if model in ("enc", "tok") and draw(st.booleans()):
        tensors.append(lengths_tensor(draw, main))
    if rarely(draw, ODDS * 2):
        extra = v2.ModelInferRequest.InferInputTensor(
            name=draw(TENSOR_NAMES),
            datatype=draw(DATATYPES),
            shape=draw(st.lists(INT64_DIMS, max_size=3)),
        )
        tensors.append(DrawnTensor(extra, draw(st.integers(0, 4)), None))
    raw = draw(st.booleans())
    for drawn in tensors:
        if raw:
            request.raw_input_contents.append(raw_contents(draw, drawn))
        else:
            fill_typed(draw, drawn)
        request.inputs.append(drawn.tensor)
    if raw and rarely(draw, ODDS * 2):
        request.raw_input_contents.append(draw(st.binary(max_size=8)))  # one entry too many
    for output in mostly(draw, st.just([]), st.lists(OUTPUT_NAMES, min_size=1, max_size=2)):
        request.outputs.add(name=output, parameters=mostly(draw, st.just({}), INFER_PARAMETERS))
    return request


def infer_tiny_timeout(request: v2.ModelInferRequest) -> bool:
    parameter = request.parameters.get("timeout_ms")
    if parameter is None:
        return False
    which = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, which) if which else None
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 < value <= TINY_TIMEOUT_MS
    )


@FUZZ
@given(request=infer_requests())
def test_model_infer(fuzz: FuzzServer, request: v2.ModelInferRequest) -> None:
    code, details = outcome(lambda: fuzz.v2.ModelInfer(request, timeout=CALL_TIMEOUT_S))
    check("ModelInfer", request, code, details, INFERENCE, infer_tiny_timeout(request))


@FUZZ
@given(requests=st.lists(infer_requests(), max_size=3))
def test_model_stream_infer(fuzz: FuzzServer, requests: list[v2.ModelInferRequest]) -> None:
    for index, request in enumerate(requests):
        request.id = str(index)  # answers come in completion order; ids pair them up
    code, details, answers = stream_outcome(
        fuzz.v2.ModelStreamInfer(iter(requests), timeout=CALL_TIMEOUT_S)
    )
    # NOTE: failed requests answer inline (error_message); the stream itself stays OK unless a
    # message breaks gRPC's size limit.
    sent = cast(list[Message], requests)
    check("ModelStreamInfer", sent, code, details, frozenset({Code.RESOURCE_EXHAUSTED}))
    if code != Code.OK:
        return
    ids = sorted(a.infer_response.id for a in answers)
    assert ids == [r.id for r in requests], describe(sent)
    for answer in answers:
        message = answer.error_message
        request = requests[int(answer.infer_response.id)]
        assert INTERNAL_MESSAGE not in message, f"{message!r}\nsent: {describe(request)}"
        assert "Traceback" not in message, message


# --- afterwards --------------------------------------------------------------------------------


def test_still_serving_after_the_fuzz(fuzz: FuzzServer) -> None:
    encode = pb.EncodeRequest(model="enc")
    encode.inputs.sequences.add(shape=[3, FEATURES], values=[0.25] * 3 * FEATURES)
    assert len(fuzz.api.Encode(encode, timeout=CALL_TIMEOUT_S).encodings) == 1
    generate = pb.GenerateRequest(model="s2s", texts=pb.TextInputs(texts=["hello"]))
    assert len(fuzz.api.Generate(generate, timeout=CALL_TIMEOUT_S).outputs) == 1
    infer = v2.ModelInferRequest(model_name="tok")
    infer.inputs.add(name="TOKENS", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend(
        [1, 2, 3]
    )
    assert fuzz.v2.ModelInfer(infer, timeout=CALL_TIMEOUT_S).outputs[0].name == "ENCODING"
    chunk = pb.SessionChunk(text="abc")
    opened = pb.SessionRequest(open=pb.SessionOpen(model="txt"))
    replies = list(fuzz.api.StreamSession(iter([opened, pb.SessionRequest(chunk=chunk)])))
    assert replies[-1].chunk.steps == 3
    # NOTE: the management fuzz may have unloaded the spare model (the server is then rightly
    # not ready: every configured model is required); loading it back must work.
    fuzz.api.LoadModel(pb.LoadModelRequest(name=SPARE), metadata=AUTH, timeout=CALL_TIMEOUT_S)
    assert fuzz.v2.ServerReady(v2.ServerReadyRequest()).ready


# --- bugs the fuzz found, fixed: the refusals they now get ---------------------------------------


def _v2_version_request(version: str) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="enc", model_version=version)
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 1, FEATURES])
    request.inputs[0].contents.fp32_contents.extend([0.5] * FEATURES)
    return request


# str.isdigit() takes these, int() does not ('²') or reads them as 1 ('١', Arabic-Indic one).
NON_ASCII_DIGITS = ["²", "١"]


@pytest.mark.parametrize("version", NON_ASCII_DIGITS)
@pytest.mark.parametrize("rpc", ["ModelReady", "ModelMetadata", "ModelInfer"])
def test_v2_version_not_in_ascii_digits_is_invalid_argument(
    fuzz: FuzzServer, rpc: str, version: str
) -> None:
    # Was INTERNAL (v2_grpc._version: int('²') raised ValueError).
    request: Message
    field = "version"
    if rpc == "ModelReady":
        request = v2.ModelReadyRequest(name="enc", version=version)
    elif rpc == "ModelMetadata":
        request = v2.ModelMetadataRequest(name="enc", version=version)
    else:
        request, field = _v2_version_request(version), "model_version"
    code, details = outcome(lambda: getattr(fuzz.v2, rpc)(request, timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert details == (
        f"{field}: must be a positive integer written with the digits 0-9, got {version!r}"
    )


def test_v2_version_of_too_many_digits_is_invalid_argument(fuzz: FuzzServer) -> None:
    # NOTE: int() refuses strings of over 4300 digits (ValueError): the length is bounded first.
    request = _v2_version_request("1" * 5000)
    code, details = outcome(lambda: fuzz.v2.ModelInfer(request, timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert details == (
        "model_version: must be a positive integer of at most 19 digits, got 5000 characters"
    )


def test_v2_stream_version_not_in_ascii_digits_names_the_field(fuzz: FuzzServer) -> None:
    # Was answered inline with "internal error".
    answers = fuzz.v2.ModelStreamInfer(iter([_v2_version_request("²")]), timeout=CALL_TIMEOUT_S)
    (answer,) = list(answers)
    assert answer.error_message.startswith("model_version: must be a positive integer"), answer


@pytest.mark.parametrize(
    ("datatype", "value", "limits"),
    [
        ("UINT8", 256, "[0, 255]"),
        ("INT8", -129, "[-128, 127]"),
        ("UINT16", 70000, "[0, 65535]"),
        ("INT16", 40000, "[-32768, 32767]"),
    ],
)
def test_typed_contents_out_of_their_datatype_range_are_invalid_argument(
    fuzz: FuzzServer, datatype: str, value: int, limits: str
) -> None:
    # Was INTERNAL (grpc_convert._from_contents: numpy's OverflowError).
    request = v2.ModelInferRequest(model_name="tok")
    tensor = request.inputs.add(name="TOKENS", datatype=datatype, shape=[1, 2])
    field = TYPED_FIELD[datatype]
    getattr(tensor.contents, field).extend([1, value])
    code, details = outcome(lambda: fuzz.v2.ModelInfer(request, timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert details == f"inputs[0].data[1]: {value} is outside the {datatype} range {limits}"
    # In range, the same datatype reaches the model.
    getattr(tensor.contents, field)[1] = 2
    assert fuzz.v2.ModelInfer(request, timeout=CALL_TIMEOUT_S).outputs[0].name == "ENCODING"


@pytest.mark.parametrize("length", [201, 256])
@pytest.mark.parametrize("rpc", ["LoadModel", "ReloadModel", "UnloadModel", "RepositoryModelLoad"])
def test_a_model_name_over_the_length_limit_is_invalid_argument(
    fuzz: FuzzServer, rpc: str, length: int
) -> None:
    # Was INTERNAL for 256 characters (Path.is_dir(): OSError "File name too long").
    name = "a" * length
    request: Message
    field = "name"
    if rpc == "LoadModel":
        request = pb.LoadModelRequest(name=name)
    elif rpc == "ReloadModel":
        request = pb.ReloadModelRequest(name=name)
    elif rpc == "UnloadModel":
        request = pb.UnloadModelRequest(name=name)
    else:
        request, field = v2.RepositoryModelLoadRequest(model_name=name), "model_name"
    stub: Any = fuzz.v2 if rpc.startswith("Repository") else fuzz.api
    method = getattr(stub, rpc)
    code, details = outcome(lambda: method(request, metadata=AUTH, timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"{field}: a model name is 1–200 letters, digits"), details


def test_a_model_name_at_the_length_limit_is_looked_up(fuzz: FuzzServer) -> None:
    request = pb.LoadModelRequest(name="a" * 200)
    code, _ = outcome(lambda: fuzz.api.LoadModel(request, metadata=AUTH, timeout=CALL_TIMEOUT_S))
    assert code == Code.NOT_FOUND  # a fine name; nothing by it on disk


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_empty_shape_with_huge_dimensions_is_invalid_argument(fuzz: FuzzServer, raw: bool) -> None:
    # Was INTERNAL (numpy: "array is too big" reshaping zero elements to [0, 2**62, 4]).
    request = v2.ModelInferRequest(model_name="enc")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[0, 2**62, FEATURES])
    if raw:
        request.raw_input_contents.append(b"")
    code, details = outcome(lambda: fuzz.v2.ModelInfer(request, timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert details.startswith(
        "inputs[0].shape: the non-zero dimensions must multiply to at most 2147483648"
    ), details


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/rnnserve.v1.RnnServe/Encode", "rnnserve.v1.EncodeRequest"),
        ("/rnnserve.v1.RnnServe/GetModel", "rnnserve.v1.GetModelRequest"),
        ("/inference.GRPCInferenceService/ModelInfer", "inference.ModelInferRequest"),
        ("/inference.GRPCInferenceService/ModelReady", "inference.ModelReadyRequest"),
    ],
)
def test_invalid_utf8_in_a_string_field_is_invalid_argument(
    fuzz: FuzzServer, method: str, message: str
) -> None:
    # Was UNKNOWN "Unexpected DecodeError": grpc parsed the request before any servicer code.
    # NOTE: protobuf refuses to build such a message, so its bytes are written by hand:
    # field 1 (model / name / model_name), length 2, "\xc3\x28" (a truncated UTF-8 sequence).
    call = fuzz.channel.unary_unary(method)
    code, details = outcome(lambda: call(b"\x0a\x02\xc3\x28", timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert details == f"request: not a valid {message} message"


def _long_echo_requests(text: str) -> list[tuple[str, Message]]:
    """Requests that each refuse a long client string they name in the error."""
    name = _v2_version_request("1")
    name.inputs[0].name = text
    output = _v2_version_request("1")
    output.outputs.add(name=text)
    pooling = _v2_version_request("1")
    pooling.parameters["pooling"].string_param = text
    datatype = _v2_version_request("1")
    datatype.inputs[0].datatype = text
    encode = pb.EncodeRequest(model="enc", pooling=text)
    encode.inputs.sequences.add(shape=[1, FEATURES], values=[0.5] * FEATURES)
    return [
        ("ModelInfer", name),
        ("ModelInfer", output),
        ("ModelInfer", pooling),
        ("ModelInfer", datatype),
        ("Encode", encode),
    ]


@pytest.mark.parametrize("case", range(5))
def test_a_long_client_string_is_echoed_cut_short(fuzz: FuzzServer, case: int) -> None:
    # Were RESOURCE_EXHAUSTED: the whole string went back in the status details, over gRPC's
    # metadata limit, instead of the refusal naming the field.
    rpc, request = _long_echo_requests("x" * 50_000)[case]
    stub: Any = fuzz.api if rpc == "Encode" else fuzz.v2
    code, details = outcome(lambda: getattr(stub, rpc)(request, timeout=CALL_TIMEOUT_S))
    assert code == Code.INVALID_ARGUMENT, (code, details[:200])
    assert len(details) < 1000 and "(50000 characters)" in details, details[:300]
