"""Our inference.GRPCInferenceService has the Open Inference Protocol's exact field numbers.

The reference is the independent tritonclient package's own descriptor. It is read in a
subprocess: both files define `inference.*` symbols and one descriptor pool cannot hold both.
"""

from __future__ import annotations

import subprocess
import sys

from google.protobuf import descriptor_pb2

from rnnserve_client.proto.inference import grpc_service_pb2

_DUMP = "import sys; from tritonclient.grpc import service_pb2 as s; " + (
    "sys.stdout.buffer.write(s.DESCRIPTOR.serialized_pb)"
)


def _triton() -> descriptor_pb2.FileDescriptorProto:
    out = subprocess.run(
        [sys.executable, "-c", _DUMP], check=True, capture_output=True, timeout=60
    ).stdout
    return descriptor_pb2.FileDescriptorProto.FromString(out)


def _messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str = ""
) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}
    for message in messages:
        name = prefix + message.name
        found[name] = message
        found.update(_messages(list(message.nested_type), name + "."))
    return found


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple[int, int, int, str]]:
    return {f.name: (f.number, f.type, f.label, f.type_name) for f in message.field}


# Our one extension: model metadata `parameters` (field 6 and its map entry, as MLServer's
# dataplane.proto numbers it); clients built on the reference skip the unknown field.
EXTENSION_FIELDS = {"ModelMetadataResponse": {"parameters"}}
EXTENSION_MESSAGES = {"ModelMetadataResponse.ParametersEntry"}


def test_every_message_matches_triton_field_for_field() -> None:
    ours_file = descriptor_pb2.FileDescriptorProto.FromString(
        grpc_service_pb2.DESCRIPTOR.serialized_pb
    )
    ours = _messages(list(ours_file.message_type))
    theirs = _messages(list(_triton().message_type))
    assert len(ours) > 25
    for name, message in ours.items():
        if name in EXTENSION_MESSAGES:
            continue
        assert name in theirs, f"{name} is not in the reference"
        fields = _fields(message)
        extension = EXTENSION_FIELDS.get(name, set())
        reference = _fields(theirs[name])
        assert not extension & set(reference), f"{name}: an extension field is in the reference"
        assert {k: v for k, v in fields.items() if k not in extension} == reference, name


def test_the_metadata_extension_is_numbered_as_mlserver_numbers_it() -> None:
    (field,) = [
        f
        for f in grpc_service_pb2.ModelMetadataResponse.DESCRIPTOR.fields
        if f.name == "parameters"
    ]
    assert field.number == 6
    assert field.message_type.fields_by_name["value"].message_type.name == "InferParameter"


def test_every_rpc_matches_triton() -> None:
    ours_file = descriptor_pb2.FileDescriptorProto.FromString(
        grpc_service_pb2.DESCRIPTOR.serialized_pb
    )
    (ours,) = ours_file.service
    (theirs,) = _triton().service
    assert ours.name == theirs.name == "GRPCInferenceService"
    reference = {m.name: m for m in theirs.method}
    names = {m.name for m in ours.method}
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata"} <= names
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex"} <= names
    for method in ours.method:
        ref = reference[method.name]
        assert (method.input_type, method.output_type) == (ref.input_type, ref.output_type)
        assert (method.client_streaming, method.server_streaming) == (
            ref.client_streaming,
            ref.server_streaming,
        )
