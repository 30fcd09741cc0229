"""Our io.cloudevents.v1 messages are the CloudEvents Protobuf Format's, on the wire.

The layout below is the one the specification's ``cloudevents.proto`` defines (package
``io.cloudevents.v1``; CloudEvent, its attribute value oneof, CloudEventBatch), written out here
from the spec rather than copied: every name, number, type and oneof must match, or a producer
built on the official proto would send fields we read as something else. A message encoded by
hand, byte by byte, as such a producer sends it, must decode to the same event.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F

from shared.gen.io.cloudevents.v1 import cloudevents_pb2

SPEC: dict[str, dict[str, tuple[int, int, str | None]]] = {
    # name: (number, type, oneof)
    "CloudEvent": {
        "id": (1, F.TYPE_STRING, None),
        "source": (2, F.TYPE_STRING, None),
        "spec_version": (3, F.TYPE_STRING, None),
        "type": (4, F.TYPE_STRING, None),
        "attributes": (5, F.TYPE_MESSAGE, None),
        "binary_data": (6, F.TYPE_BYTES, "data"),
        "text_data": (7, F.TYPE_STRING, "data"),
        "proto_data": (8, F.TYPE_MESSAGE, "data"),
    },
    "CloudEvent.CloudEventAttributeValue": {
        "ce_boolean": (1, F.TYPE_BOOL, "attr"),
        "ce_integer": (2, F.TYPE_INT32, "attr"),
        "ce_string": (3, F.TYPE_STRING, "attr"),
        "ce_bytes": (4, F.TYPE_BYTES, "attr"),
        "ce_uri": (5, F.TYPE_STRING, "attr"),
        "ce_uri_ref": (6, F.TYPE_STRING, "attr"),
        "ce_timestamp": (7, F.TYPE_MESSAGE, "attr"),
    },
    "CloudEventBatch": {
        "events": (1, F.TYPE_MESSAGE, None),
    },
}


def _message(name: str) -> object:
    node: object = cloudevents_pb2
    for part in name.split("."):
        node = getattr(node, part)
    return node


def test_the_messages_have_the_specifications_package_names_numbers_types_and_oneofs() -> None:
    assert cloudevents_pb2.DESCRIPTOR.package == "io.cloudevents.v1"
    for name, fields in SPEC.items():
        descriptor = _message(name).DESCRIPTOR  # type: ignore[attr-defined]
        assert descriptor.full_name == f"io.cloudevents.v1.{name}"
        ours = {
            f.name: (f.number, f.type, f.containing_oneof.name if f.containing_oneof else None)
            for f in descriptor.fields
        }
        assert ours == fields, name
    fields_by_name = cloudevents_pb2.CloudEvent.DESCRIPTOR.fields_by_name
    attributes = fields_by_name["attributes"].message_type
    assert attributes is not None and attributes.GetOptions().map_entry  # map<string, CloudEventAttributeValue>
    value = attributes.fields_by_name["value"].message_type
    assert value is not None and value.full_name == "io.cloudevents.v1.CloudEvent.CloudEventAttributeValue"
    any_type = fields_by_name["proto_data"].message_type
    assert any_type is not None and any_type.full_name == "google.protobuf.Any"


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = bytes([number << 3 | wire])
    return key + (bytes([len(payload)]) + payload if wire == 2 else payload)


def test_a_producer_s_bytes_decode_to_the_same_event() -> None:
    # What a producer on the official proto sends: id, source, specversion, type, one string
    # attribute (map entry: key 1, value 2 -> ce_string 3) and text data (field 7).
    entry = _field(1, 2, b"subject") + _field(2, 2, _field(3, 2, b"orders/7"))
    wire = (
        _field(1, 2, b"1234")
        + _field(2, 2, b"/src")
        + _field(3, 2, b"1.0")
        + _field(4, 2, b"com.example.x")
        + _field(5, 2, entry)
        + _field(7, 2, b'{"a":1}')
    )
    event = cloudevents_pb2.CloudEvent.FromString(wire)
    assert (event.id, event.source, event.spec_version, event.type) == ("1234", "/src", "1.0", "com.example.x")
    assert event.attributes["subject"].ce_string == "orders/7"
    assert event.WhichOneof("data") == "text_data" and event.text_data == '{"a":1}'
    assert event.SerializeToString(deterministic=True) == wire
    batch = cloudevents_pb2.CloudEventBatch.FromString(_field(1, 2, wire))
    assert list(batch.events) == [event]
