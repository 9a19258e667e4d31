"""The door in front of Bolt at POST /slack/events: a signed request of a shape we handle, or a clear 4xx.

Bolt parses a body by guessing (`application/json`, a leading `{`, or the word "payload" anywhere in a
form), and its own code and ours then read fields as if Slack had sent them. A request that is signed
but malformed (a replayed body edited by someone holding the signing secret, a proxy that rewrote the
content type, a bug on Slack's side) would then end in a 500. Here the signature is checked first
(nothing unverified is parsed), then the body is parsed by Bolt's own parser, so we judge exactly what
Bolt will see, and every field that Bolt's context builders or our listeners read is type-checked.
Only then does Bolt dispatch it.
"""
from __future__ import annotations

from dataclasses import dataclass

from slack_bolt.request import BoltRequest
from slack_bolt.request.internals import parse_body
from slack_sdk.signature import SignatureVerifier

STR_FIELDS = ("type", "trigger_id", "api_app_id", "token", "team_id", "user_id", "user_name", "channel_id",
              "enterprise_id", "command", "text", "response_url", "challenge", "callback_id", "action_ts")
DICT_FIELDS = ("team", "user", "channel", "container", "message", "view", "event", "state")
ID_HOLDERS = ("team", "user", "channel", "enterprise")


@dataclass(frozen=True)
class Refusal:
    status: int
    error: str
    message: str


def check(raw: bytes, headers, *, signing_secret: str) -> tuple[BoltRequest | None, Refusal | None]:
    """A BoltRequest ready to dispatch, or why the request is refused."""
    verifier = SignatureVerifier(signing_secret)
    timestamp = headers.get("X-Slack-Request-Timestamp")
    signature = headers.get("X-Slack-Signature")
    if not verifier.is_valid(raw, timestamp, signature):
        return None, Refusal(401, "bad_signature", "X-Slack-Signature is missing, stale or does not match the body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, Refusal(400, "bad_body", "the body is not UTF-8")
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower() or None
    try:
        body = parse_body(text, content_type)
    except (ValueError, TypeError, RecursionError):
        return None, Refusal(400, "bad_body", "the body is neither a form nor a JSON object Slack would send")
    problem = shape_problem(body)
    if problem:
        return None, Refusal(400, "bad_body", problem)
    try:
        request = BoltRequest(body=text, headers={k: v for k, v in headers.items()})
    except Exception:  # noqa: BLE001 - anything Bolt cannot build a context from is a bad request
        return None, Refusal(400, "bad_body", "the body does not have the fields Slack sends")
    return request, None


HANDLED_INTERACTIONS = ("block_actions", "view_submission", "view_closed")


def shape_problem(body) -> str | None:
    """What is wrong with a parsed body, or None. Only the kinds of request this app handles pass (button
    clicks, modal submissions, the slash command, Slack's URL check), with every field that Bolt's matchers
    or our listeners read present and of the right type."""
    if not isinstance(body, dict):
        return "the body must be a JSON object or a form"
    kind = body.get("type")
    if "command" in body:
        if not isinstance(body["command"], str) or not isinstance(body.get("user_id"), str):
            return "a slash command needs string command and user_id"
    elif kind == "url_verification":
        if not isinstance(body.get("challenge"), str):
            return "url_verification needs a string challenge"
    elif kind not in HANDLED_INTERACTIONS:
        return f"this app does not handle requests of type {str(kind)[:40]!r}"
    elif kind == "block_actions":
        actions = body.get("actions")
        if not isinstance(actions, list) or not actions or not all(
                isinstance(a, dict) and isinstance(a.get("action_id"), str) for a in actions):
            return "block_actions needs a non-empty list of actions with string action_id"
    elif not isinstance(body.get("view"), dict) or not isinstance(body["view"].get("callback_id"), str) \
            or not isinstance(body["view"].get("type"), str):
        return f"{kind} needs a view with string callback_id and type"
    if kind in HANDLED_INTERACTIONS and not isinstance(body.get("user"), dict):
        return "an interaction needs a user object"
    for name in STR_FIELDS:
        if name in body and not isinstance(body[name], str):
            return f"{name} must be a string"
    for name in DICT_FIELDS:
        if name in body and body[name] is not None and not isinstance(body[name], dict):
            return f"{name} must be an object"
    enterprise = body.get("enterprise")
    if enterprise is not None and not isinstance(enterprise, (dict, str)):
        return "enterprise must be an object or a string"
    for name in ID_HOLDERS:
        holder = body.get(name)
        if isinstance(holder, dict):
            for key in ("id", "team_id", "enterprise_id", "name", "username"):
                if key in holder and holder[key] is not None and not isinstance(holder[key], str):
                    return f"{name}.{key} must be a string"
    if "is_enterprise_install" in body and not isinstance(body["is_enterprise_install"], (bool, str)):
        return "is_enterprise_install must be a boolean"
    problem = _authorizations(body.get("authorizations", []))
    if problem:
        return problem
    for name in ("container", "message"):
        holder = body.get(name) or {}
        for key, value in holder.items():
            if key in ("ts", "message_ts", "channel_id", "type", "thread_ts", "view_id") and not isinstance(value, str):
                return f"{name}.{key} must be a string"
    actions = body.get("actions", [])
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        return "actions must be a list of objects"
    for action in actions:
        for key in ("action_id", "block_id", "value", "type", "action_ts"):
            if key in action and not isinstance(action[key], str):
                return f"actions[].{key} must be a string"
    return _view(body.get("view"))


def _authorizations(value) -> str | None:
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        return "authorizations must be a list of objects"
    for auth in value:
        for key in ("enterprise_id", "team_id", "user_id"):
            if auth.get(key) is not None and not isinstance(auth[key], str):
                return f"authorizations[].{key} must be a string"
        if "is_enterprise_install" in auth and not isinstance(auth["is_enterprise_install"], (bool, str)):
            return "authorizations[].is_enterprise_install must be a boolean"
    return None


def _view(view) -> str | None:
    if view is None:
        return None
    for key in ("id", "type", "callback_id", "private_metadata", "team_id", "app_installed_team_id", "hash"):
        if key in view and view[key] is not None and not isinstance(view[key], str):
            return f"view.{key} must be a string"
    state = view.get("state")
    if state is None:
        return None
    if not isinstance(state, dict):
        return "view.state must be an object"
    values = state.get("values", {})
    if not isinstance(values, dict):
        return "view.state.values must be an object"
    for block in values.values():
        if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
            return "view.state.values must map blocks to actions to objects"
        for element in block.values():
            if element.get("value") is not None and not isinstance(element["value"], str):
                return "view.state.values.*.*.value must be a string"
    return None
