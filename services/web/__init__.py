"""The web service: the HTTP face of the pipeline. It is a gRPC client of the api only (no
database connection), like the executor.

``POST /webhooks/{key}`` turns a delivery into an event: the body is decoded here, and the api
checks the key and the signature and stores the event (``WebhookService/DeliverWebhook``). The
sender is answered 202 only after that call returned, that is after the commit; whenever the
api cannot store it, 503 with Retry-After, never a 2xx (``webhooks``).

``/`` is the operator console (``console``): server-rendered pages over the api's reads and
operator RPCs, made for the person signed in with their own api token (``session``), kept
live by Server-Sent Events fed by the api's tails (``live``).
"""

from services.web.app import create_app

__all__ = ["create_app"]
