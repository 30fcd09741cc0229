"""Derived records: the config a rule renders for an event, refused when it could not be sent.

Whatever the api stores it must be able to send later (GetX, ListX, the watch stream), so a
rendered config and the enforcement carrying it are measured before the write.
"""

from __future__ import annotations

from typing import Any

from services.api import matching
from services.api.encoded import Measure, record_size
from shared import limits
from shared.errors import InvalidArgument


def derive(
    rule: dict[str, Any],
    trigger_ref: str,
    payload: dict[str, Any],
    context: dict[str, Any],
    budget: matching.Budget,
    measure: Measure,
    field: str,
) -> tuple[dict[str, Any], int]:
    """The config ``rule`` renders for an event, and the encoded size of the enforcement that
    carries it; InvalidArgument naming ``field`` when that enforcement could not be sent."""
    ref = rule["ref"]
    try:
        config: dict[str, Any] = matching.render(rule["action_params"], context, budget)
    except matching.RenderTooLarge:
        raise InvalidArgument.one(
            field,
            f"rule {ref} (with the other rules this event matches) would render more than "
            f"{limits.MAX_CREATE_RESPONSE_BYTES:,} characters of templates for it",
        ) from None
    depth = measure.struct(config)[1]
    if depth > limits.MAX_DERIVED_DEPTH:
        raise InvalidArgument.one(
            field,
            f"rule {ref} would render a config nested {depth} levels deep for this event; "
            f"at most {limits.MAX_DERIVED_DEPTH} can be sent",
        )
    size = record_size(measure, [ref, trigger_ref], [config, payload], [rule["conditions"]])
    if size > limits.MAX_ENFORCEMENT_BYTES:
        raise InvalidArgument.one(
            field,
            f"rule {ref} would make an enforcement of {size:,} bytes for this event (payload and rendered config); "
            f"at most {limits.MAX_ENFORCEMENT_BYTES:,} can be sent",
        )
    return config, size
