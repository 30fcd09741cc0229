"""The wire walker that reads an enforcement id out of a watch message protobuf refuses."""

from __future__ import annotations

import random

import pytest
from google.protobuf import message as protobuf_message

from services.executor._salvage import LEN, SGROUP, Salvaged, Unsalvageable, WireError, fields, salvage_delivery
from shared.gen.automation.v1 import enforcement_pb2

Response = enforcement_pb2.WatchEnforcementsResponse


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, body: bytes) -> bytes:
    return tag(number, LEN) + varint(len(body)) + body


def delivery(id_: int = 42, rule_ref: str = "demo.a", attempt: int = 2, depth: int = 0) -> Response:
    """A delivery whose payload nests ``depth`` JSON objects (built in place: copying a value
    too deep to decode would fail)."""
    msg = Response()
    msg.delivery.attempt = attempt
    enforcement = msg.delivery.enforcement
    enforcement.id = id_
    enforcement.rule = 7
    enforcement.rule_ref = rule_ref
    enforcement.trigger_ref = "core.webhook"
    enforcement.config.fields["to"].string_value = "ops"
    level = enforcement.payload
    for _ in range(depth):
        level = level.fields["a"].struct_value
    level.fields["leaf"].string_value = "x"
    return msg


def test_a_valid_delivery_gives_what_the_decoder_reads() -> None:
    data = delivery().SerializeToString()
    decoded = Response.FromString(data).delivery
    assert salvage_delivery(data) == Salvaged(
        id=decoded.enforcement.id, rule_ref=decoded.enforcement.rule_ref, attempt=decoded.attempt
    )


def test_a_delivery_too_deep_to_decode_still_gives_its_id() -> None:
    data = delivery(id_=9001, depth=40).SerializeToString()
    with pytest.raises(protobuf_message.DecodeError):
        Response.FromString(data)
    assert salvage_delivery(data) == Salvaged(id=9001, rule_ref="demo.a", attempt=2)


def test_nesting_far_beyond_any_recursion_limit_costs_no_recursion() -> None:
    # 50,000 nested length-delimited fields inside the enforcement's payload: the walker steps
    # over the payload without looking inside.
    inner = b""
    for _ in range(50_000):
        inner = length_delimited(1, inner)
    enforcement = tag(1, 0) + varint(77) + length_delimited(8, inner)
    data = length_delimited(1, length_delimited(1, enforcement))
    assert salvage_delivery(data).id == 77


@pytest.mark.parametrize("cut", [1, 2, 3, 10, -40, -1])
def test_truncated_bytes_give_no_id(cut: int) -> None:
    data = delivery(depth=5).SerializeToString()
    with pytest.raises(WireError):
        salvage_delivery(data[:cut])


def test_no_proper_prefix_of_a_delivery_gives_an_id() -> None:
    # The delivery is the message's only field, so every cut breaks its framing.
    data = delivery(depth=3).SerializeToString()
    for cut in range(len(data)):
        with pytest.raises(Unsalvageable):
            salvage_delivery(data[:cut])


@pytest.mark.parametrize(
    ("garbage", "why"),
    [
        (b"\xff" * 11, "varint longer than 10 bytes"),
        (b"\x0e", "invalid wire type 6"),
        (b"\x0f", "invalid wire type 7"),
        (b"\x00\x01", "invalid field number 0"),
        (b"\x0a\x05abc", "claims 5 bytes, 3 left"),
        (b"\x09\x01\x02", "truncated fixed-size field 1"),
        (b"\x0c", "unmatched end of group 1"),
        (b"\x0b\x08\x01", "unterminated group 1"),
        (b"", "no delivery in the message"),
    ],
)
def test_garbage_gives_no_id_and_says_why(garbage: bytes, why: str) -> None:
    with pytest.raises(Unsalvageable, match=why):
        salvage_delivery(garbage)


def test_random_bytes_give_an_id_only_where_the_framing_holds() -> None:
    rng = random.Random(20240611)
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(1, 64))
        try:
            found = salvage_delivery(data)
        except Unsalvageable:
            continue
        # Whatever framing random bytes happen to have, an id given is a positive one that a
        # decoder, where it accepts the bytes, agrees with.
        assert found.id > 0
        try:
            decoded = Response.FromString(data)
        except protobuf_message.DecodeError:
            continue
        assert decoded.delivery.enforcement.id == found.id


def test_a_heartbeat_has_no_id() -> None:
    beat = Response(heartbeat=enforcement_pb2.Heartbeat(in_flight=3)).SerializeToString()
    with pytest.raises(Unsalvageable, match="no delivery"):
        salvage_delivery(beat)


@pytest.mark.parametrize("id_", [0, -5])
def test_a_non_positive_id_is_not_trusted(id_: int) -> None:
    with pytest.raises(Unsalvageable, match="no valid enforcement id"):
        salvage_delivery(delivery(id_=id_).SerializeToString())


def test_a_later_heartbeat_clears_the_delivery_as_in_the_decoder() -> None:
    beat = Response(heartbeat=enforcement_pb2.Heartbeat(in_flight=1)).SerializeToString()
    data = delivery().SerializeToString() + beat
    assert Response.FromString(data).WhichOneof("kind") == "heartbeat"
    with pytest.raises(Unsalvageable, match="no delivery"):
        salvage_delivery(data)
    assert salvage_delivery(beat + delivery(id_=8).SerializeToString()).id == 8


def test_a_delivery_without_an_enforcement_has_no_id() -> None:
    data = Response(delivery=enforcement_pb2.Delivery(attempt=1)).SerializeToString()
    with pytest.raises(Unsalvageable, match="no enforcement"):
        salvage_delivery(data)


def test_repeated_occurrences_merge_as_the_decoder_merges_them() -> None:
    # Concatenated encodings decode as their merge: the later id and ref win, the attempt of
    # the first stays where the second has none.
    first = delivery(id_=1, rule_ref="demo.first", attempt=4).SerializeToString()
    second = Response()
    second.delivery.enforcement.id = 2
    second.delivery.enforcement.rule_ref = "demo.second"
    data = first + second.SerializeToString()
    decoded = Response.FromString(data).delivery
    assert salvage_delivery(data) == Salvaged(
        id=decoded.enforcement.id, rule_ref=decoded.enforcement.rule_ref, attempt=decoded.attempt
    )
    assert (decoded.enforcement.id, decoded.attempt) == (2, 4)


def test_unknown_fields_and_groups_are_stepped_over() -> None:
    enforcement = (
        tag(99, SGROUP)
        + tag(1, 0)
        + varint(555)  # an id inside a group is not the enforcement's id
        + tag(99, 4)
        + tag(1, 0)
        + varint(12)
        + tag(1000, 5)
        + b"\x01\x02\x03\x04"
        + tag(1001, 1)
        + bytes(8)
    )
    data = length_delimited(1, length_delimited(1, enforcement))
    assert Response.FromString(data).delivery.enforcement.id == 12
    assert salvage_delivery(data).id == 12


def test_an_illegible_rule_ref_is_kept_legible_and_bounded() -> None:
    ref = b"demo.\xff\xfe" + b"x" * 1000
    enforcement = tag(1, 0) + varint(3) + length_delimited(3, ref)
    found = salvage_delivery(length_delimited(1, length_delimited(1, enforcement)))
    assert found.id == 3
    assert found.rule_ref.startswith("demo.\ufffd\ufffdxxx")
    assert len(found.rule_ref) == 255


def test_fields_lists_the_top_level_fields_in_order() -> None:
    data = tag(1, 0) + varint(300) + length_delimited(3, b"ab") + tag(4, 5) + (7).to_bytes(4, "little")
    assert list(fields(data)) == [(1, 0, 300), (3, LEN, b"ab"), (4, 5, 7)]
