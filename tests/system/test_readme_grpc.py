"""Every `grpcurl` command in the docs works against the real server, as grpcurl would run it.

The commands are read out of the Markdown files' code blocks (shell continuation lines and
quoting included) and replayed against `rnnserve serve` on the bundled `demo-repository/`:
grpcurl itself is not installable here, so the test does what it does. Flags are read with Go's
flag rules (flags before the address), the method is resolved through the server's reflection
service only (ProtoReflectionDescriptorDatabase feeding a DescriptorPool, no generated stubs — so
this also proves reflection is all grpcurl needs), the `-d` body becomes the request through
protobuf's JSON mapping (grpcurl's protojson: lowerCamelCase or proto field names, unknown fields
refused), and the answer, printed as grpcurl prints it (lowerCamelCase, int64 as strings, no
default values), must match the output the doc shows under the command (`[...]` marks an elided
part; tests/doc_examples.py says how a doc elides). `list` commands become reflection
`list_services` queries. A wrong command fails naming its file and line.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.core.settings import Settings
from tests.doc_examples import (
    DocCommand,
    DocError,
    brief,
    check_json_output,
    code_blocks,
    doc_files,
    documented_json,
    shell_commands,
)
from tests.support import ServerProcess

pytestmark = pytest.mark.timeout(60)

# The docs address the server that `make serve` (and the CLI's defaults) start.
DOCUMENTED_HOSTS = {"127.0.0.1", "localhost"}
DOCUMENTED_GRPC_PORT: int = Settings.model_fields["grpc_port"].default
CALL_TIMEOUT_S = 30.0

# grpcurl's flags that a replay understands; anything else is refused rather than ignored.
BOOL_FLAGS = {"plaintext", "emit-defaults", "allow-unknown-fields", "v", "vv", "format-error"}
VALUE_FLAGS = {"d", "H", "rpc-header", "max-time", "connect-timeout", "format"}
# A documented grpcurl command that grpcurl would reject, or whose answer differs from the doc.
CommandError = DocError


@dataclass
class Grpcurl:
    address: str = ""
    verb: str = "call"  # "call" | "list" | "describe"
    symbol: str = ""
    plaintext: bool = False
    data: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    emit_defaults: bool = False
    allow_unknown_fields: bool = False
    max_time_s: float | None = None


# --- reading the docs ---------------------------------------------------------------------------


def doc_commands() -> list[DocCommand]:
    """The grpcurl commands in the fenced code blocks of every Markdown file."""
    return [
        command
        for path in doc_files()
        for block in code_blocks(path)
        for command in shell_commands(block)
        if command.text.startswith("grpcurl ")
    ]


DOC_COMMANDS = doc_commands()


def parse_grpcurl(text: str) -> Grpcurl:
    """The command line as grpcurl reads it (Go's flag package: flags end at the first
    non-flag argument; `-flag value` only for non-boolean flags)."""
    try:
        argv = shlex.split(text, comments=True)
    except ValueError as exc:
        raise CommandError(f"not valid shell: {exc}") from None
    if not argv or argv[0] != "grpcurl":
        raise CommandError("does not start with grpcurl")
    call = Grpcurl()
    args = argv[1:]
    while args and args[0].startswith("-") and args[0] != "-":
        arg = args.pop(0)
        if arg == "--":
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            if has_value and value not in ("true", "false"):
                raise CommandError(f"-{name} takes true or false, not {value!r}")
            on = value != "false"
            if name == "plaintext":
                call.plaintext = on
            elif name == "emit-defaults":
                call.emit_defaults = on
            elif name == "allow-unknown-fields":
                call.allow_unknown_fields = on
            continue
        if name not in VALUE_FLAGS:
            raise CommandError(f"grpcurl flag {arg} is not one a replay understands")
        if not has_value:
            if not args:
                raise CommandError(f"-{name} needs a value")
            value = args.pop(0)
        if name == "d":
            call.data = value
        elif name in ("H", "rpc-header"):
            key, colon, header = value.partition(":")
            if not colon:
                raise CommandError(f"header {value!r} is not 'name: value'")
            # grpcurl sends metadata keys lowercased, values trimmed.
            call.headers.append((key.strip().lower(), header.strip()))
        elif name == "max-time":
            try:
                call.max_time_s = float(value)
            except ValueError:
                raise CommandError(f"-max-time {value!r} is not a number of seconds") from None
        elif name == "format" and value != "json":
            raise CommandError(f"-format {value}: the docs show JSON")
    if not args:
        raise CommandError("no address")
    call.address = args.pop(0)
    if args and args[0] in ("list", "describe"):
        call.verb = args.pop(0)
        call.symbol = args.pop(0) if args else ""
    elif args:
        call.symbol = args.pop(0)
    else:
        raise CommandError("no method, and not `list` or `describe`")
    if args:
        raise CommandError(f"unexpected arguments {args} (flags go before the address)")
    if call.verb != "call" and call.data is not None:
        raise CommandError(f"-d with `{call.verb}`")
    return call


def _check_address(call: Grpcurl) -> None:
    host, _, port = call.address.rpartition(":")
    if host not in DOCUMENTED_HOSTS or port != str(DOCUMENTED_GRPC_PORT):
        raise CommandError(
            f"address {call.address}: `make serve` serves gRPC on 127.0.0.1:{DOCUMENTED_GRPC_PORT}"
        )
    if not call.plaintext:
        raise CommandError("without -plaintext grpcurl speaks TLS; the server serves plaintext")


# --- comparing with the documented output -------------------------------------------------------


def _sensible(type_name: str, message: dict[str, Any]) -> str | None:
    """What is missing from an answer of this type for it to be a real answer, if anything."""
    if not message:
        return "an empty answer"
    if type_name == "rnnserve.v1.EncodeResponse":
        if not message.get("encodings") or not all(e.get("values") for e in message["encodings"]):
            return "no encodings"
        if "labels" in message and not all(message["labels"]):
            return "an empty label"
    if type_name == "rnnserve.v1.GenerateResponse" and (
        not message.get("outputs") or not all(o.get("text") for o in message["outputs"])
    ):
        return "no output text"
    if type_name == "grpc.health.v1.HealthCheckResponse" and message.get("status") != "SERVING":
        return f"health {message.get('status')}"
    return None


# --- replaying ----------------------------------------------------------------------------------


def _method(pool: descriptor_pool.DescriptorPool, symbol: str) -> MethodDescriptor:
    """`pkg.Service/Method` or `pkg.Service.Method`, resolved as grpcurl does, by reflection."""
    service_name, slash, method_name = symbol.rpartition("/")
    if not slash:
        service_name, _, method_name = symbol.rpartition(".")
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        raise CommandError(f"reflection knows no service {service_name!r}") from None
    if method_name not in service.methods_by_name:
        known = ", ".join(service.methods_by_name)
        raise CommandError(f"{service_name} has no method {method_name!r} (it has {known})")
    method: MethodDescriptor = service.methods_by_name[method_name]
    return method


def _invoke(channel: grpc.Channel, method: MethodDescriptor, call: Grpcurl) -> list[Message]:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = request_class()
    try:
        # grpcurl sends an empty message when there is no -d.
        json_format.Parse(call.data or "{}", request, call.allow_unknown_fields)
    except json_format.ParseError as exc:
        raise CommandError(f"-d is not a {method.input_type.full_name}: {exc}") from None
    path = f"/{method.containing_service.full_name}/{method.name}"
    timeout = call.max_time_s or CALL_TIMEOUT_S
    options: dict[str, Any] = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    if method.client_streaming:
        raise CommandError("client-streaming methods are not replayed")
    if method.server_streaming:
        stream = channel.unary_stream(path, **options)
        return list(stream(request, metadata=call.headers, timeout=timeout))
    unary = channel.unary_unary(path, **options)
    return [unary(request, metadata=call.headers, timeout=timeout)]


def replay(command: DocCommand, port: int) -> None:
    """Run `command` as grpcurl would against the server on 127.0.0.1:`port`."""
    call = parse_grpcurl(command.text)
    _check_address(call)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        try:
            if call.verb == "list":
                if call.symbol:
                    service = pool.FindServiceByName(call.symbol)
                    listed = [m.full_name for m in service.methods]
                else:
                    listed = list(database.get_services())
                missing = [name for name in command.output if name not in listed]
                if missing:
                    raise CommandError(f"lists {listed}, not the documented {missing}")
                return
            if call.verb == "describe":
                # Any symbol reflection knows (service, method, message) is describable;
                # without one grpcurl describes every listed service.
                for symbol in [call.symbol] if call.symbol else database.get_services():
                    database.FindFileContainingSymbol(symbol.replace("/", "."))
                return
            method = _method(pool, call.symbol)
            answers = _invoke(channel, method, call)
        except KeyError as exc:
            raise CommandError(f"reflection does not know {exc}") from None
        except grpc.RpcError as exc:
            raise CommandError(f"the server answered {exc.code().name}: {exc.details()}") from None
    printed = [
        json_format.MessageToDict(answer, always_print_fields_with_no_presence=call.emit_defaults)
        for answer in answers
    ]
    for message in printed:
        if (problem := _sensible(method.output_type.full_name, message)) is not None:
            raise CommandError(f"{problem}: {json.dumps(brief(message), ensure_ascii=False)}")
    check_json_output(documented_json(command.output), printed)


# --- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_port(demo_server: ServerProcess) -> int:
    """The bound gRPC port of `rnnserve serve` on the demo repository (tests/conftest.py)."""
    return demo_server.grpc_port


# --- tests --------------------------------------------------------------------------------------


def test_docs_show_the_grpcurl_commands_users_need() -> None:
    symbols = {parse_grpcurl(command.text).symbol for command in DOC_COMMANDS}
    verbs = {parse_grpcurl(command.text).verb for command in DOC_COMMANDS}
    assert "list" in verbs, "README: show `grpcurl -plaintext 127.0.0.1:8001 list`"
    assert {
        "grpc.health.v1.Health/Check",
        "rnnserve.v1.RnnServe/Encode",
        "rnnserve.v1.RnnServe/Generate",
    } <= symbols, symbols


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_documented_grpcurl_command_works(command: DocCommand, grpc_port: int) -> None:
    try:
        replay(command, grpc_port)
        return
    except CommandError as exc:
        problem = str(exc)
    # Failing outside the `except` keeps the report to the doc line, the problem and the command.
    pytest.fail(f"{command.where}: {problem}\n    {command.text}", pytrace=False)


# Bodies as the docs quote them for the shell.
DATES = """'{"model": "dates", "texts": {"texts": ["1 May 2020"]}}'"""
UNKNOWN_FIELD = """'{"model": "dates", "text": "1 May 2020"}'"""
NOT_JSON = """'{"model": }'"""
AT = "127.0.0.1:8001"


@pytest.mark.parametrize(
    ("text", "output", "error"),
    [
        # A stream prints one message per token; int64 prints as a string, index 0 not at all.
        (
            f"grpcurl -plaintext -d {DATES} {AT} rnnserve.v1.RnnServe.GenerateStream",
            ['{"token": {"token": "6", "text": "2"}}', '{"result": {"outputs": [...]}}'],
            None,
        ),
        (
            f"grpcurl -plaintext -d {DATES} {AT} rnnserve.v1.RnnServe/Generate",
            ['{"model": "Dates"}'],
            "the doc says",
        ),
        (f"grpcurl -plaintext -d {DATES} 127.0.0.1:8000 rnnserve.v1.RnnServe/Generate", [], "8001"),
        (f"grpcurl -plaintext -d {DATES} {AT} rnnserve.v1.RnnServe/Translate", [], "no method"),
        (f"grpcurl -plaintext -d {DATES} {AT} rnnserve.v2.RnnServe/Generate", [], "no service"),
        (f"grpcurl -plaintext -d {DATES} {AT} rnnserve.v1.RnnServe/Encode", [], "INVALID_ARGUMENT"),
        (f"grpcurl -d {DATES} {AT} -plaintext rnnserve.v1.RnnServe/Generate", [], "flags go"),
        (f"grpcurl -d {DATES} {AT} rnnserve.v1.RnnServe/Generate", [], "TLS"),
        (
            f"grpcurl -plaintext -d {UNKNOWN_FIELD} {AT} rnnserve.v1.RnnServe/Generate",
            [],
            'no field named "text"',
        ),
        (f"grpcurl -plaintext -d {NOT_JSON} {AT} rnnserve.v1.RnnServe/Generate", [], "JSON"),
        (f"grpcurl -plaintext {AT} list", ["rnnserve.v1.Rnnserve"], "not the documented"),
    ],
)
def test_replay_catches_wrong_commands(
    text: str, output: list[str], error: str | None, grpc_port: int
) -> None:
    command = DocCommand("example", text, output)
    if error is None:
        replay(command, grpc_port)
        return
    with pytest.raises(CommandError, match=re.escape(error)):
        replay(command, grpc_port)
