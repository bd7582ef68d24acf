"""Protobuf's wire format, read and written by hand where building messages would cost more:
counting a request's values before it is parsed (message_limits.py), and FloatArray's packed
floats as one byte string (convert.py)."""

from __future__ import annotations

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5


class Malformed(Exception):
    """The bytes are not a well-formed message (left for protobuf to refuse)."""


def tag(field_number: int, wire_type: int) -> int:
    """A field's key: its number and wire type."""
    return field_number << 3 | wire_type


def read_varint(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; `Malformed` past `end` or 64 bits."""
    if pos < end and data[pos] < 0x80:
        return data[pos], pos + 1
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def write_varint(value: int) -> bytes:
    """`value` (≥ 0) as a varint."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((b,)) for b in range(0x80)]
