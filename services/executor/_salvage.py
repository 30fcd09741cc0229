"""Finding the enforcement in a watch message that protobuf refuses to decode.

A delivery can be well framed and still undecodable: its payload nested deeper than the
decoder's recursion limit, say. Dropping it would leave its lease to expire and the stream's
other work to be redelivered with it; knowing its id, the executor can release that one
enforcement alone, so only it is charged an attempt and it ends up exhausted where an
operator sees it.

The walker reads only the wire format's framing (tags, varints, fixed-size and
length-delimited fields) along one path, WatchEnforcementsResponse.delivery ->
Delivery.enforcement -> Enforcement.id, and steps over everything else without looking
inside, so however deep the payload nests it costs no recursion. The field numbers come from
the generated descriptors, so the walker follows the contract if it ever changes.

It is strict about framing: a message whose framing is broken on the path is corrupt, and an
id read from corrupt bytes might be another enforcement's, so none is returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from shared.gen.automation.v1 import common_pb2, enforcement_pb2
from shared.limits import MAX_REF

_DELIVERY_FIELD = enforcement_pb2.WatchEnforcementsResponse.DESCRIPTOR.fields_by_name["delivery"]
_DELIVERY = _DELIVERY_FIELD.number
# The delivery's oneof siblings (the heartbeat): a later one of them clears the delivery.
_DELIVERY_RIVALS = frozenset(
    f.number for f in (_DELIVERY_FIELD.containing_oneof.fields if _DELIVERY_FIELD.containing_oneof else ())
) - {_DELIVERY}
_ENFORCEMENT = enforcement_pb2.Delivery.DESCRIPTOR.fields_by_name["enforcement"].number
_ATTEMPT = enforcement_pb2.Delivery.DESCRIPTOR.fields_by_name["attempt"].number
_ID = common_pb2.Enforcement.DESCRIPTOR.fields_by_name["id"].number
_RULE_REF = common_pb2.Enforcement.DESCRIPTOR.fields_by_name["rule_ref"].number

# Wire types (https://protobuf.dev/programming-guides/encoding/#structure).
VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_MAX_FIELD_NUMBER = (1 << 29) - 1

FieldValue = int | bytes


class Unsalvageable(ValueError):
    """No enforcement id can be trusted from these bytes; the message says why."""


class WireError(Unsalvageable):
    """The bytes are not well-formed protobuf wire data."""


@dataclass(frozen=True, slots=True)
class Salvaged:
    """What could be read of an undecodable delivery."""

    id: int
    rule_ref: str
    """Empty when the message has none."""
    attempt: int
    """0 when the message has none."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` (at most 10 bytes, as protobuf allows) and the position after it."""
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
    raise WireError("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _field(buf: bytes, pos: int) -> tuple[int, int, FieldValue, int]:
    """The field at ``pos``: (number, wire type, value, position after it). A group marker's
    value is 0; a length-delimited value is its bytes, not looked into."""
    key, pos = _varint(buf, pos)
    number, wire_type = key >> 3, key & 7
    if not 0 < number <= _MAX_FIELD_NUMBER:
        raise WireError(f"invalid field number {number}")
    if wire_type == VARINT:
        value, pos = _varint(buf, pos)
        return number, wire_type, value, pos
    if wire_type in (I64, I32):
        size = 8 if wire_type == I64 else 4
        if pos + size > len(buf):
            raise WireError(f"truncated fixed-size field {number}")
        return number, wire_type, int.from_bytes(buf[pos : pos + size], "little"), pos + size
    if wire_type == LEN:
        length, pos = _varint(buf, pos)
        if pos + length > len(buf):
            raise WireError(f"field {number} claims {length} bytes, {len(buf) - pos} left")
        return number, wire_type, buf[pos : pos + length], pos + length
    if wire_type in (SGROUP, EGROUP):
        return number, wire_type, 0, pos
    raise WireError(f"invalid wire type {wire_type} (field {number})")


def fields(buf: bytes) -> Iterator[tuple[int, int, FieldValue]]:
    """The top-level fields of one message, in order: (number, wire type, value).

    Groups (a proto2 relic, never in this contract, but legal in unknown fields) are stepped
    over with a counter rather than recursion, so their nesting costs no stack either.
    Raises WireError where the framing is broken.
    """
    pos = 0
    open_groups: list[int] = []
    while pos < len(buf):
        number, wire_type, value, pos = _field(buf, pos)
        if wire_type == SGROUP:
            open_groups.append(number)
        elif wire_type == EGROUP:
            if not open_groups or open_groups.pop() != number:
                raise WireError(f"unmatched end of group {number}")
        elif not open_groups:
            yield number, wire_type, value
    if open_groups:
        raise WireError(f"unterminated group {open_groups[-1]}")


def _message(buf: bytes, number: int, rivals: frozenset[int] = frozenset()) -> bytes | None:
    """The submessage in field ``number``, or None when absent.

    A singular message field that occurs more than once is the merge of its occurrences, and
    concatenated encodings decode as exactly that merge, so the parts are joined; a later
    member of its oneof (``rivals``) clears it. An occurrence with another wire type is an
    unknown field to a decoder, so it is skipped. The whole of ``buf`` is walked, so broken
    framing anywhere in it is noticed.
    """
    parts: list[bytes] = []
    present = False
    for n, wire_type, value in fields(buf):
        if n == number and wire_type == LEN and isinstance(value, bytes):
            parts.append(value)
            present = True
        elif n in rivals:
            parts.clear()
            present = False
    return b"".join(parts) if present else None


def _last_varint(buf: bytes, number: int) -> int | None:
    """A singular scalar's value: the last occurrence wins, as in a decoder."""
    found: int | None = None
    for n, wire_type, value in fields(buf):
        if n == number and wire_type == VARINT and isinstance(value, int):
            found = _signed64(value)
    return found


def _last_text(buf: bytes, number: int) -> str:
    found = b""
    for n, wire_type, value in fields(buf):
        if n == number and wire_type == LEN and isinstance(value, bytes):
            found = value
    # Invalid UTF-8 may be the very reason the message did not decode: keep what is legible.
    return found[: MAX_REF * 4].decode("utf-8", "replace")[:MAX_REF]


def salvage_delivery(data: bytes) -> Salvaged:
    """The enforcement id (and, for the log, rule ref and attempt) of an encoded
    WatchEnforcementsResponse. Raises Unsalvageable when there is no positive id to trust."""
    delivery = _message(data, _DELIVERY, _DELIVERY_RIVALS)
    if delivery is None:
        raise Unsalvageable("no delivery in the message")
    enforcement = _message(delivery, _ENFORCEMENT)
    if enforcement is None:
        raise Unsalvageable("no enforcement in the delivery")
    id_ = _last_varint(enforcement, _ID)
    if id_ is None or id_ <= 0:
        raise Unsalvageable(f"no valid enforcement id in the delivery (found {id_})")
    return Salvaged(
        id=id_,
        rule_ref=_last_text(enforcement, _RULE_REF),
        attempt=_last_varint(delivery, _ATTEMPT) or 0,
    )
