"""POST /webhooks/intercom (and HEAD, Intercom's reachability check).

The route verifies the signature, stores the event in the inbox and answers at once; the worker does
the rest (bot/intercom/inbound.py). Answers:

- 200 `stored` / `duplicate`: a customer message, or a teammate's `!recovery start` note
  (`conversation.admin.noted`), kept once per notification id + part id.
- 200 `ignored`: another topic, or nothing the customer wrote (an admin's part, our own reply echoed).
- 200 `pong`: the `ping` topic Intercom sends when the webhook is set up; nothing is stored.
- 401: a missing or wrong `X-Hub-Signature`. 400: a signed body that is not a JSON object.
- 404: the channel is off (no INTERCOM_ACCESS_TOKEN).

Signatures are checked with the standard library's `hmac` (HMAC-SHA1 of the raw body keyed by the app's
client secret, compared in constant time): the scheme is one line of it, so a library would add a
dependency without removing any risk.
"""
from __future__ import annotations

import hashlib
import hmac
import json

from flask import Blueprint, Response, current_app, jsonify, request

from bot.http import ApiError, json_body
from bot.intercom import parse
from recovery import inbox

SIGNATURE_HEADER = "X-Hub-Signature"
SOURCE = "intercom"

bp = Blueprint("intercom", __name__)


def sign(secret: str, body: bytes) -> str:
    """The X-Hub-Signature value Intercom sends for `body`."""
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    if not secret or not header:
        return False
    # bytes on both sides: compare_digest refuses str with non-ASCII characters, which a header may hold
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode("utf-8", "replace"))


def _container():
    c = current_app.extensions["recoverybot"]
    if not c.settings.intercom_enabled:
        raise ApiError(404, "not_configured", "the Intercom channel is not configured on this server")
    return c


@bp.route("/webhooks/intercom", methods=["HEAD"])
def check():
    _container()
    return Response(status=200)


@bp.post("/webhooks/intercom")
def receive():
    c = _container()
    raw = request.get_data(cache=True)
    if not signature_ok(c.settings.INTERCOM_CLIENT_SECRET, raw, request.headers.get(SIGNATURE_HEADER)):
        c.metrics.inbox(SOURCE, "bad_signature")
        raise ApiError(401, "bad_signature", f"{SIGNATURE_HEADER} is missing or does not match the body")
    event = json_body()  # 400 for an empty, malformed or non-object body
    if event.get("topic") == "ping":
        c.metrics.inbox(SOURCE, "ping")
        return jsonify(status="pong")
    message = parse.customer_message(event) or parse.staff_command(event)
    if message is None or (isinstance(message, parse.StaffCommand)
                           and message.admin_id == c.settings.INTERCOM_ADMIN_ID):
        c.metrics.inbox(SOURCE, "ignored")
        return jsonify(status="ignored")
    stored = inbox.store(c.db, source=SOURCE, delivery_key=message.delivery_key,
                         conversation_key=message.conversation_key, now=c.clock.now(),
                         payload={"topic": event.get("topic"), "conversation_id": message.conversation_id,
                                  "part_id": message.part_id,
                                  # the event holds the customer's words: encrypted until processed
                                  "event_enc": c.keyring.encrypt(_as_text(raw, event))})
    c.metrics.inbox(SOURCE, "stored" if stored else "duplicate")  # the commit woke the worker (bot/wakeup.py)
    return jsonify(status="stored" if stored else "duplicate")


def _as_text(raw: bytes, event: dict) -> str:
    """The body as received when it is plain UTF-8 (nearly always), else the event re-serialised."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # json.loads also reads UTF-16 and UTF-32
        return json.dumps(event)
    return json.dumps(event) if text.startswith("\ufeff") else text
