"""The cost of a gRPC request, bounded before protobuf parses it.

protobuf (upb) parses a message into its own memory, far larger than the wire for some shapes: a
zero in a packed int64 field is 1 byte on the wire and 8 in memory (plus the array's growth), an
empty string or message 2 bytes on the wire and 16–80 in memory: near the message size limit,
gigabytes and seconds of a blocked event loop (`python -m bench.probes parse-costs`).
So a large message is walked first, by its wire format and its descriptor, without building
anything: its fields (strings, bytes, messages and unpacked numbers each count one) and the
integers of its packed varint fields (counted by numpy) are its values. Packed fixed-width
numbers (floats) and bytes (raw tensor contents) are copied whole by the parser: one field each,
whatever their length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.core.errors import PayloadTooLarge
from service.core.settings import Settings
from service.grpc_api.protobuf_wire import (
    FIXED32,
    FIXED64,
    LENGTH_DELIMITED,
    VARINT,
    Malformed,
    read_varint,
)

# Messages up to this size are parsed unchecked: even at 50× the wire they cost little.
SCAN_ABOVE_BYTES = 1 << 20

_VARINT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """What one request message may hold: `max_values` values, `max_fields` fields."""

    max_values: int
    # NOTE: fields are walked in Python, so their bound is far below max_values: a few per
    # sequence (a tokens or feature sequence is 2–3 fields, a text one) and room for the rest.
    # Only a message that would be refused anyway (more sequences than allowed) reaches it.
    max_fields: int

    @classmethod
    def from_settings(cls, settings: Settings) -> MessageLimits:
        """The limits of a server's settings (`request_values_limit`, 4 fields a sequence)."""
        return cls(settings.request_values_limit, 4 * settings.max_sequences_per_request + 4096)

    def check(self, data: bytes, descriptor: Descriptor) -> None:
        """`PayloadTooLarge("request")` when the message in `data` passes a limit; messages up
        to SCAN_ABOVE_BYTES are not walked, malformed ones are left to protobuf."""
        if len(data) <= SCAN_ABOVE_BYTES:
            return
        try:
            values, walked = _count(data, descriptor, self.max_fields)
        except Malformed:
            return
        if walked > self.max_fields:
            raise PayloadTooLarge(
                "request",
                f"more than {self.max_fields:,} fields (strings, messages, unpacked numbers); "
                "the limit is 4 × max_sequences_per_request + 4096",
            )
        if values > self.max_values:
            raise PayloadTooLarge(
                "request",
                f"about {values:,} values (integers, strings, messages); the limit is "
                f"{self.max_values:,} (--max-request-values): send large inputs as raw "
                "tensor contents (raw_input_contents, FloatArray values)",
            )


def _count(data: bytes, descriptor: Descriptor, max_walked: int) -> tuple[int, int]:
    """(values, fields walked) of the message, stopping once more than `max_walked` fields."""
    view = memoryview(data)
    values = walked = 0
    stack: list[tuple[int, int, Descriptor | None]] = [(0, len(data), descriptor)]
    while stack:
        pos, end, message = stack.pop()
        while pos < end:
            walked += 1
            if walked > max_walked:
                return values, walked
            tag, pos = read_varint(view, pos, end)
            wire = tag & 7
            values += 1
            if wire == VARINT:
                _, pos = read_varint(view, pos, end)
            elif wire == FIXED64:
                pos += 8
            elif wire == FIXED32:
                pos += 4
            elif wire == LENGTH_DELIMITED:
                length, pos = read_varint(view, pos, end)
                if pos + length > end:
                    raise Malformed
                field = message.fields_by_number.get(tag >> 3) if message is not None else None
                if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                    stack.append((pos, pos + length, field.message_type))
                elif field is not None and field.type in _VARINT_TYPES:
                    values += _varints(view, pos, pos + length) - 1
                pos += length
            else:
                raise Malformed
        if pos != end:
            raise Malformed
    return values, walked


def _varints(view: memoryview, start: int, end: int) -> int:
    """The integers of a packed field: one per byte that ends a varint (< 0x80), counted in
    slices so that the comparison's array stays small."""
    count = 0
    for first in range(start, end, _SLICE):
        chunk = np.frombuffer(view, np.uint8, min(_SLICE, end - first), first)
        count += int(np.count_nonzero(chunk < 0x80))
    return count


_SLICE = 1 << 22
