"""Delivers outbox chat messages for `intercom:` conversations.

A payload is what recovery.notify queues (`message`, `locale`, `buttons`, `context`), or one of the
channel's own steps (`action`): `redact` (a customer's part that held a secret), `note` and `assign`
(the two halves of a handover after the reply).

Intercom's reply API takes no idempotency key, so delivery is at least once: a worker that dies after
Intercom accepted a reply and before the outbox row is marked sent will post it again. Each handover
step is its own outbox message, so a failed assignment never re-posts the customer's reply.
"""
from __future__ import annotations

import logging
from html import escape

from bot.intercom.client import IntercomApi, button
from recovery import outbox
from recovery.outbox import Outgoing, PermanentFailure

log = logging.getLogger(__name__)

HANDOVER = "handover"
NOTE_BLOCK = "handover_note"
NOTE_LOCALE = "en"  # internal notes are for the support team, like the Slack cards


def to_html(text: str) -> str:
    """Chat text (plain, from templates) as Intercom body HTML: paragraphs and line breaks kept."""
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "".join(f"<p>{'<br>'.join(escape(line) for line in p.strip().split(chr(10)))}</p>"
                   for p in paragraphs) or "<p></p>"


class IntercomSender:
    def __init__(self, *, api: IntercomApi, renderer, db, keyring, clock, handover_team_id: str = ""):
        self.api, self.renderer, self.db, self.keyring, self.clock = api, renderer, db, keyring, clock
        self.handover_team_id = handover_team_id

    def send(self, message: Outgoing) -> None:
        p = message.payload
        conversation_id = p["conversation"].split(":", 1)[1]
        action = p.get("action", "reply")
        if action == "reply":
            text = self._render(self.renderer.chat, p["message"], p["locale"], p.get("context") or {})
            buttons = [button(k, self._render(self.renderer.button, k, p["locale"])) for k in p.get("buttons", [])]
            if p["message"] == HANDOVER:
                self._queue_handover_steps(message)
            self.api.reply(conversation_id, html=to_html(text), buttons=buttons)
        elif action == "note":
            note = self._render(self.renderer.chat, p.get("message") or NOTE_BLOCK, NOTE_LOCALE, p.get("context") or {})
            self.api.note(conversation_id, html=to_html(note))
        elif action == "assign":
            self.api.assign_to_team(conversation_id, p["team_id"])
        elif action == "redact":
            self.api.redact(conversation_id, part_id=p["part_id"], source=p.get("part_kind") == "source")
        else:
            raise PermanentFailure(f"unknown Intercom action {action!r}")

    @staticmethod
    def _render(render, *args) -> str:
        try:
            return render(*args)
        except KeyError as exc:  # a template block missing: a deploy problem, not a passing one
            raise PermanentFailure(f"no chat template for {args[0]!r}: {exc}") from None

    def _queue_handover_steps(self, message: Outgoing) -> None:
        """The internal note and the team assignment, as outbox messages of their own. Queued before the
        reply is posted (a repeated key is ignored), so a retry of the reply cannot lose them."""
        p = message.payload
        steps = [("note", {})]
        if self.handover_team_id:
            steps.append(("assign", {"team_id": self.handover_team_id}))
        else:
            log.warning("INTERCOM_HANDOVER_TEAM_ID is not set: a handover leaves the conversation unassigned")
        with self.db.transaction() as session:
            for action, extra in steps:
                outbox.enqueue(session, self.keyring, kind="chat", key=f"{message.idempotency_key}:{action}",
                               now=self.clock.now(),
                               payload={"conversation": p["conversation"], "action": action,
                                        "context": p.get("context", {}), **extra})
