"""Every limit on what the api accepts, derives and sends: one table, one place.

Each value is chosen so that whatever the api accepts it can also store (PostgreSQL's btree
row limit is ~2,700 bytes, a jsonb value at most 255 MB), send (every message fits the
4 MiB that gRPC clients receive by default) and decode again (protobuf refuses messages
nested deeper than 100 levels; a JSON level inside a ``google.protobuf.Struct`` costs three:
Struct, map entry, Value). The README's "Limits" table mirrors this module; the proto
comments name the limit of each field.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

# --- transport -------------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 4 * MiB
"""Largest request the api receives and largest message it sends: gRPC's default receive
limit, so every default-configured client can read every answer."""
MAX_METADATA_BYTES = 16 * KiB
"""Largest request metadata (headers) the api accepts."""
MAX_CONCURRENT_RPCS = 256
"""Room grpc leaves past the budgets' total (API_MAX_CALLS + API_HEALTH_WATCHES, see
services/api/budgets.py) before it refuses calls itself: health checks and the refusal of
unauthenticated or over-budget calls never find the server full. The budgets refuse first,
per principal."""
MAX_REQUEST_MEMORY_BYTES = 256 * MiB
"""Memory the calls being handled may claim together (their size times REQUEST_AMPLIFICATION);
past it, calls wait their turn within their deadline."""
REQUEST_AMPLIFICATION = 8
"""What a request costs while handled, as a multiple of its size: decoded messages and JSON,
derived enforcements (bounded at 8x a CreateEvents call) and the answer."""
MAX_CONCURRENT_STREAMS = 256
"""HTTP/2 streams (calls) one connection may have open at once: as many as the api serves in
all. Lower, a busy client's channel got its calls refused (RST_STREAM REFUSED_STREAM, seen as
UNAVAILABLE) at 128 in flight in the benchmark's overload probes, where the api would rather
queue them or answer RESOURCE_EXHAUSTED past MAX_CONCURRENT_RPCS."""
MAX_CONNECTION_IDLE_MS = 30 * 60 * 1000
"""A connection with no call for this long is closed (clients reconnect transparently)."""
MAX_CONNECTION_AGE_MS = 4 * 3600 * 1000
"""Connections are recycled after this long so load spreads over replicas; calls in flight
get MAX_CONNECTION_AGE_GRACE_MS to finish (watch streams reconnect and resume)."""
MAX_CONNECTION_AGE_GRACE_MS = 30 * 1000

# --- text fields -----------------------------------------------------------------------------
MAX_REF = 255
"""A reference (``pack.name``): trigger, rule and action refs, and every ref filter."""
MAX_SOURCE_REF = 255
"""An event's ``source_ref`` (free text, indexed)."""
MAX_LABEL = 255
MAX_DESCRIPTION = 4096
MAX_REQUEST_ID = 200
MAX_EXECUTOR_ID = 200
MAX_REASON = 1024
"""ResolveEnforcement's ``reason`` and ReleaseEnforcement's ``error``."""
MAX_FILTER_TEXT = 255
"""A free-text filter (history's ``changed_field``, ``operation``)."""
MAX_PAGE_TOKEN = 512

# --- JSON values (google.protobuf.Struct fields) ---------------------------------------------
MAX_JSON_DEPTH = 16
"""Nesting of objects and lists in any JSON value given or derived (payload, config, action
parameters, schemas, a rendered config): 16 JSON levels are about 50 protobuf levels, half
of what a decoder accepts, so the value still decodes inside every message that carries it."""
MAX_PAYLOAD_BYTES = 256 * KiB
"""An event's ``payload`` (and CreateEnforcement's), encoded as protobuf."""
MAX_CONFIG_BYTES = 64 * KiB
"""An event's or enforcement's ``config`` as given."""
MAX_ACTION_PARAMS_BYTES = 64 * KiB
"""A rule's ``action_params``."""
MAX_SCHEMA_BYTES = 64 * KiB
"""A trigger's ``param_schema`` and ``out_schema``."""
MAX_KEY = 256
"""An object key inside any JSON value."""

# --- rules -----------------------------------------------------------------------------------
MAX_CONDITIONS = 64
"""Nodes (tests and groups, nested ones included) of one rule's condition tree."""
MAX_SEARCH_ITEM_TESTS = 250_000
"""Item tests (list items times the nodes of the item test) the rules of a trigger may make
for one event in all, through ``search``: bounds what one event can cost (about 0.2 s of
CPU); an event past it is refused."""
MAX_CONDITION_DEPTH = 16
"""Levels of a rule's condition tree (the top-level list is level 1)."""
MAX_CONDITION_VALUE_BYTES = 4 * KiB
"""The value a condition compares with, encoded as protobuf."""
MAX_FIELD_PATH = 256
"""A condition's field path or a template's path, in characters."""
MAX_FIELD_SEGMENTS = 16
"""Segments of a dot path (``a.b.c`` has three)."""
MAX_TEMPLATES = 32
"""``{{ ... }}`` references in one rule's action parameters."""
MAX_RULES_PER_TRIGGER = 200
"""Rules watching one trigger."""
MAX_CONDITIONS_PER_TRIGGER = 1000
"""Conditions of all the rules of one trigger, which every event of it is matched against:
the bound on matching cost per event (the worst, 1,000 substring searches of a 256 KiB
payload string, costs ~0.4 s of CPU and runs off the event loop)."""

# --- derived records -------------------------------------------------------------------------
MAX_DERIVED_DEPTH = 24
"""Nesting of a rendered config: a template may put a (16-deep) payload value inside the
action parameters' own nesting. 24 JSON levels are about 76 protobuf levels inside a watch
stream message, still under the decoders' 100."""
MAX_ENFORCEMENT_BYTES = 1 * MiB
"""One enforcement as sent on the watch stream (payload, rendered config, conditions)."""
MAX_CREATE_RESPONSE_BYTES = 3 * MiB
"""CreateEvent's answer: the event and every enforcement it produced (each carries the payload)."""
MAX_DERIVED_PER_CALL_BYTES = 32 * MiB
"""Everything one CreateEvents call would write (events and enforcements), encoded."""

# --- batches and pages -----------------------------------------------------------------------
MAX_BATCH = 1000
"""Events in CreateEvents, decisions in ResolveEnforcements."""
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_BYTES = 2 * MiB
"""A list page stops early, with its next_page_token, before it would exceed this."""
MAX_IN_FLIGHT = 1000
"""A watch stream's ``max_in_flight``."""
MAX_WATCH_STREAMS_PER_PRINCIPAL = 16
"""Watch streams one principal may have open on one api replica."""
MAX_CREDIT_PER_PRINCIPAL = 2000
"""Enforcements one principal's watch streams may hold at once on one replica (their
max_in_flight in all): a client that opens streams and never resolves cannot take all work."""
MAX_WATCH_FILTERS = 100
"""Refs in a watch stream's ``rule_refs`` or ``trigger_refs``."""

# --- payload search and counts ---------------------------------------------------------------
MAX_SEARCH_BYTES = 4 * KiB
"""ListEvents' ``payload_contains``, encoded: a filter, not a document."""
MAX_SEARCH_DEPTH = 8
"""Levels of ``payload_contains``."""
MAX_SEARCH_VALUES = 32
"""Values (scalars and empty objects or arrays) in ``payload_contains``: each is one more
path the index looks up, and one more row set PostgreSQL intersects."""
SEARCH_TIMEOUT_S = 2.0
"""How long a list statement with ``payload_contains`` may run (its own statement_timeout): a
search whose matches are spread thin over compressed days stops there instead of holding a
connection for DB_STATEMENT_TIMEOUT."""
MAX_COUNT = 1000
"""``count_matching`` counts this many rows at most, then says "more": as cheap as a few pages."""
COUNT_TIMEOUT_S = 0.5
"""How long a count may run (its own statement_timeout). A count is a courtesy beside the page:
past this it is reported stopped (``matching_count_stopped``) and the page is answered anyway,
rather than the call failing or a slow count holding the page."""

# --- errors ----------------------------------------------------------------------------------
MAX_ERROR_MESSAGE = 512
"""Characters of an error's message; longer ones are cut (the details stay in the log)."""
MAX_VIOLATIONS = 10
"""Field violations listed in one BadRequest detail."""
MAX_ECHO = 60
"""Characters of a caller's value an error message may quote."""

# --- rule tools ------------------------------------------------------------------------------
DEFAULT_REPLAY_MATCHES = 100
"""Matches ReplayRule streams when the request gives no limit."""
MAX_REPLAY_MATCHES = 10_000
"""Matches one ReplayRule call may stream (and fire)."""
MAX_REPLAY_SCAN = 1_000_000
"""Events one ReplayRule call looks at before it stops (its summary then says truncated): a
rule that matches nothing still ends in bounded time."""
DEFAULT_SCHEMA_CHECK = 1_000
"""Events CheckSchema checks when its request names no limit."""
MAX_SCHEMA_CHECK = 10_000
"""Events one CheckSchema checks at most: a dry run reads payloads (up to 256 KiB each) page
by page, and validates them at a few microseconds each; past this, a sample says as much."""
MAX_SCHEMA_CHECK_EXAMPLES = 5
"""Failing events CheckSchema names."""

# --- webhooks --------------------------------------------------------------------------------
MIN_WEBHOOK_SECRET = 16
"""Characters of a webhook secret, at least: a short secret is a guessable one."""
MAX_WEBHOOK_SECRET = 255
MAX_WEBHOOK_BODY_BYTES = MAX_PAYLOAD_BYTES
"""A delivery's raw body: its payload can be no larger (the web service answers 413 past it)."""
MAX_WEBHOOK_HEADERS = 100
"""Headers of one delivery kept in the event's config (the rest are dropped)."""
MAX_WEBHOOK_HEADER_VALUE = 4096
MAX_DELIVERY_ID = 150
"""A sender's delivery id: with the trigger's id it becomes the event's request_id (200)."""
