"""What only a verified webhook delivery may say about itself: the names WebhookService writes
and EventService refuses from sensors (``events._new_event``).

A sensor and the web service hold the same role, so the api cannot tell their events apart by
the caller; it tells them apart by path instead: these names reach storage only through
``DeliverWebhook``, which sets them from what it verified itself.
"""

from __future__ import annotations

SOURCE_REF = "webhook"
"""The ``source_ref`` of every event stored from a delivery (also its config's ``source``)."""
REQUEST_ID_PREFIX = "webhook:"
"""Delivery ids are stored as request ids ``webhook:{trigger id}:{scheme}:{id}``: the replay
cache. A sensor taking one first could answer a sender's delivery with its own event."""
CONFIG_KEYS = ("hmac_verified", "signature_scheme", "source_ip", "webhook_key")
"""Config keys that describe how a delivery arrived and was checked."""
