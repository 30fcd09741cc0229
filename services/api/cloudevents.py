"""CloudEvents 1.0 as events: the one mapping, used by EventService.Publish/PublishBatch (gRPC,
the Protobuf Format's messages) and CloudEventService.DeliverCloudEvents (what the web service
decoded from the HTTP binding's three modes).

| CloudEvent | event |
|---|---|
| `type` | the trigger: its ref (Publish), or the webhook key's trigger (HTTP) |
| `source` | `source_ref` (at most 255 characters) |
| `id` + `source` | the idempotency key: `ce:` and the SHA-256 of both, so a redelivery stores one event |
| `specversion` | must be `1.0` |
| `subject`, `time`, `datacontenttype`, `dataschema`, extensions | `config.cloudevent`, with `id`, `source`, `type` |
| `data` | the payload: JSON (no `datacontenttype`, `application/json`, `*+json`), an object; else refused |

Every value is checked as CreateEvent checks its fields (sizes, depth, NUL, NaN), with the
field named after the CloudEvent (``events[2].data.repo``, ``event.attributes.subject``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from google.protobuf import json_format, struct_pb2

from services.api import validate
from services.api.servicers import provenance
from services.api.store import NewEvent
from shared import limits
from shared.errors import Violations, brief
from shared.gen.io.cloudevents.v1 import cloudevents_pb2

SPEC_VERSION = "1.0"
REQUEST_ID_PREFIX = "ce:"
"""Idempotency keys of CloudEvents: ``ce:`` and the hex SHA-256 of source and id (67 characters)."""
MAX_ID = 255
"""A CloudEvent's ``id``, in characters (the spec sets no limit; it is hashed into the key)."""
MAX_TYPE = limits.MAX_REF
MAX_ATTRIBUTES = 50
"""Optional and extension attributes of one CloudEvent."""
MAX_ATTRIBUTE_TEXT = 4096
"""Characters of one attribute's value."""
OPTIONAL = ("subject", "time", "datacontenttype", "dataschema")
RESERVED = frozenset({"id", "source", "specversion", "type", "data", "data_base64"})
"""Context attribute names that must not appear among ``attributes``: they have fields of their own."""
NAME = re.compile(r"[a-z0-9]{1,20}")
"""An attribute name, as the spec requires (lower-case letters and digits, 20 at most)."""
_JSON_TYPE = re.compile(r"^(application|text)/([a-z0-9.+-]*\+)?json$")


def is_json(content_type: str) -> bool:
    """Whether a media type says JSON (``application/json``, ``text/json``, ``*/*+json``); a
    missing one is JSON by the JSON format's default."""
    kind = content_type.split(";")[0].strip().lower()
    return not kind or bool(_JSON_TYPE.match(kind))


def request_id(source: str, id_: str) -> str:
    """The event's idempotency key: the same for every delivery of one CloudEvent."""
    return REQUEST_ID_PREFIX + hashlib.sha256(f"{source}\x00{id_}".encode()).hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON data")


def _attribute(v: Violations, field: str, value: cloudevents_pb2.CloudEvent.CloudEventAttributeValue) -> Any:
    kind = value.WhichOneof("attr")
    if kind is None:
        v.add(field, "has no value")
        return None
    if kind == "ce_boolean":
        return value.ce_boolean
    if kind == "ce_integer":
        return value.ce_integer
    if kind == "ce_bytes":
        if len(value.ce_bytes) > MAX_ATTRIBUTE_TEXT:
            v.add(field, f"must be at most {MAX_ATTRIBUTE_TEXT} bytes, got {len(value.ce_bytes)}")
        return base64.b64encode(value.ce_bytes[:MAX_ATTRIBUTE_TEXT]).decode()
    if kind == "ce_timestamp":
        try:
            return value.ce_timestamp.ToJsonString()
        except ValueError as exc:
            v.add(field, f"is not a valid timestamp: {exc}")
            return None
    text: str = getattr(value, kind)
    validate.text(v, field, text, MAX_ATTRIBUTE_TEXT)
    return text


def _data(v: Violations, field: str, ce: cloudevents_pb2.CloudEvent, content_type: str) -> dict[str, Any]:
    """The CloudEvent's data as the event's payload: a JSON object (absent data: {})."""
    kind = ce.WhichOneof("data")
    if kind is None:
        return {}
    if kind == "proto_data":
        v.add(f"{field}.proto_data", "only JSON data is accepted (binary_data or text_data)")
        return {}
    if not is_json(content_type):
        v.add(
            f"{field}.attributes.datacontenttype",
            f"only JSON data is accepted (absent, application/json or +json), got {brief(content_type)}",
        )
        return {}
    raw: bytes | str = ce.binary_data if kind == "binary_data" else ce.text_data
    if len(raw) > limits.MAX_PAYLOAD_BYTES:
        v.add(f"{field}.{kind}", f"is {len(raw):,} bytes; at most {limits.MAX_PAYLOAD_BYTES:,} are accepted")
        return {}
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        v.add(f"{field}.{kind}", f"nests deeper than {limits.MAX_JSON_DEPTH} levels")
        return {}
    except (UnicodeDecodeError, ValueError) as exc:
        v.add(f"{field}.{kind}", f"is not JSON: {brief(str(exc), 80)}")
        return {}
    if not isinstance(value, dict):
        v.add(f"{field}.{kind}", f"must be a JSON object, not {type(value).__name__}")
        return {}
    return json_object(v, f"{field}.data", value, limits.MAX_PAYLOAD_BYTES)


def json_object(v: Violations, field: str, value: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """A decoded JSON object checked as a Struct field is (size, depth, keys, NUL, finite
    numbers): converted to a Struct once, so the limits are exactly CreateEvent's."""
    struct = struct_pb2.Struct()
    try:
        json_format.ParseDict(value, struct)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as exc:
        # ParseDict refuses NaN-like floats and values past protobuf's nesting.
        v.add(field, f"cannot be stored: {brief(str(exc), 80)}")
        return {}
    return validate.json_object(v, field, struct, max_bytes)


def to_event(
    v: Violations, field: str, ce: cloudevents_pb2.CloudEvent, trigger_ref: str | None, source_config: dict[str, Any]
) -> NewEvent | None:
    """The event a CloudEvent becomes; its problems go to ``v`` (then the result is unusable).
    ``trigger_ref`` None: the trigger is the one whose ref is the CloudEvent's type."""
    validate.text(v, f"{field}.id", ce.id, MAX_ID, required=True)
    validate.text(v, f"{field}.source", ce.source, limits.MAX_SOURCE_REF, required=True)
    if ce.source.strip().lower() == provenance.SOURCE_REF:
        # The source becomes the source_ref, which only verified webhook deliveries may claim.
        v.add(f"{field}.source", f"{provenance.SOURCE_REF!r} is reserved for verified webhook deliveries")
    if ce.spec_version != SPEC_VERSION:
        v.add(f"{field}.spec_version", f"must be {SPEC_VERSION!r}, got {brief(ce.spec_version)}")
    if trigger_ref is None:
        # The type names the trigger: it must be a trigger's ref.
        validate.ref(v, f"{field}.type", ce.type)
    else:
        validate.text(v, f"{field}.type", ce.type, MAX_TYPE, required=True)
    if len(ce.attributes) > MAX_ATTRIBUTES:
        v.add(f"{field}.attributes", f"may hold at most {MAX_ATTRIBUTES}, got {len(ce.attributes)}")
        return None
    attributes: dict[str, Any] = {}
    extensions: dict[str, Any] = {}
    for name, value in sorted(ce.attributes.items()):
        where = f"{field}.attributes[{brief(name, 24)}]"
        if not NAME.fullmatch(name):
            v.add(where, "attribute names are 1 to 20 lower-case letters or digits")
            continue
        if name in RESERVED:
            v.add(where, f"{name!r} has a field of its own")
            continue
        (attributes if name in OPTIONAL else extensions)[name] = _attribute(v, f"{field}.attributes.{name}", value)
    content_type = attributes.get("datacontenttype") or ""
    if not isinstance(content_type, str):
        v.add(f"{field}.attributes.datacontenttype", "must be a string")
        content_type = "application/octet-stream"
    payload = _data(v, field, ce, content_type)
    cloudevent: dict[str, Any] = {"id": ce.id, "source": ce.source, "type": ce.type, "specversion": ce.spec_version}
    cloudevent.update(attributes)
    if extensions:
        cloudevent["extensions"] = extensions
    config = json_object(v, f"{field}.attributes", {**source_config, "cloudevent": cloudevent}, limits.MAX_CONFIG_BYTES)
    if v.items:
        return None
    return NewEvent(
        trigger_ref=trigger_ref or ce.type,
        payload=payload,
        config=config,
        source_ref=ce.source,
        request_id=request_id(ce.source, ce.id),
        # A redelivery is the same CloudEvent (id and source) with the same data; what the
        # receiving side adds to the config (arrival time, address) differs every time.
        config_in_fingerprint=False,
    )
