"""CloudEvents out: what the tails send with ``format: TAIL_FORMAT_CLOUDEVENTS``, the one mapping
from an event or an enforcement change to the Protobuf Format's ``io.cloudevents.v1.CloudEvent``.
The web service's ``GET /cloudevents/stream`` sends the same events in the JSON format.

The project's name in the types is ``automation`` (the proto package ``automation.v1``).

| attribute | event created | enforcement created | enforcement resolved |
|---|---|---|---|
| `specversion` | `1.0` | `1.0` | `1.0` |
| `type` | `dev.automation.event.created` | `...enforcement.created` | `...enforcement.resolved` |
| `source` | `CLOUDEVENTS_SOURCE` (default `/automation`) | the same | the same |
| `subject` | `event/<id>` | `enforcement/<id>` | `enforcement/<id>` |
| `id` | `event/<id>/created` | `enforcement/<id>/created` | `enforcement/<id>/resolved` |
| `time` | the event's `created` | the enforcement's `created` | its `resolved_at` |
| `datacontenttype` | `application/json` | `application/json` | `application/json` |
| data (`text_data`) | the `Event`, proto3 JSON | the `Enforcement` as stored (CREATED) | the `Enforcement`, resolved |
| `triggerref` | the trigger's ref | the trigger's ref | the trigger's ref |
| `ruleref` | the rule targeted, when one was | the rule's ref | the rule's ref |
| `status` | - | `created` | `processed` or `disabled` |
| `tailcursor` | the tail's cursor after this event | the same | the same |

``id`` names the change, not the delivery: a tail resumed from an older cursor, another replica,
or a second consumer sends one change under one id, so ``source`` + ``id`` deduplicates as the
specification asks. Every change happens once (an event is immutable, an enforcement resolves
once), so no two distinct changes share an id within one ``source``; two deployments feeding one
consumer need their own ``CLOUDEVENTS_SOURCE``. ``triggerref``, ``ruleref`` and ``status`` are
there for consumers that route on attributes only (a Knative Trigger's filter), ``tailcursor``
for one that stores the CloudEvent and resumes the tail from it later.
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from services.api import convert
from shared.gen.automation.v1 import common_pb2
from shared.gen.io.cloudevents.v1 import cloudevents_pb2

SPEC_VERSION = "1.0"
PREFIX = "dev.automation."
"""The types' namespace: reverse DNS of the project's name, as the specification recommends."""
DEFAULT_SOURCE = "/automation"
CREATED, RESOLVED = "created", "resolved"
CONTENT_TYPE = "application/json"
CURSOR_EXTENSION = "tailcursor"


def to_cloudevent(
    record: common_pb2.Event | common_pb2.Enforcement, change: str, *, source: str, cursor: str = ""
) -> cloudevents_pb2.CloudEvent:
    """The CloudEvent of one change (``created``, or ``resolved`` for an enforcement) of
    ``record`` as the tail read it; ``cursor`` is the tail's position right after it."""
    kind = "event" if isinstance(record, common_pb2.Event) else "enforcement"
    subject = f"{kind}/{record.id}"
    out = cloudevents_pb2.CloudEvent(
        id=f"{subject}/{change}", source=source, spec_version=SPEC_VERSION, type=f"{PREFIX}{kind}.{change}"
    )
    attrs = out.attributes
    attrs["subject"].ce_string = subject
    attrs["time"].ce_timestamp.CopyFrom(
        record.resolved_at if isinstance(record, common_pb2.Enforcement) and change == RESOLVED else record.created
    )
    attrs["datacontenttype"].ce_string = CONTENT_TYPE
    attrs["triggerref"].ce_string = record.trigger_ref
    if record.rule_ref:
        attrs["ruleref"].ce_string = record.rule_ref
    if isinstance(record, common_pb2.Enforcement):
        attrs["status"].ce_string = convert.ENFORCEMENT_STATUS_NAME.get(record.status, "")
    if cursor:
        attrs[CURSOR_EXTENSION].ce_string = cursor
    # The proto3 JSON mapping, as grpcurl and the console show the message.
    out.text_data = json.dumps(json_format.MessageToDict(record), ensure_ascii=False, separators=(",", ":"))
    return out


__all__ = ["CREATED", "DEFAULT_SOURCE", "PREFIX", "RESOLVED", "to_cloudevent"]
