"""Turns a stored inbound event into a dialog turn. One function per source."""
from __future__ import annotations

from sqlalchemy.orm import Session

from recovery.dialog import Dialog, Incoming
from recovery.models import InboxEvent


def make_handler(deps, keyring, *, intercom=None, slack=None):
    def prepare(source: str, payload: dict):
        """Network work done before the inbox transaction opens (see recovery.inbox.process_one)."""
        return intercom.prepare(payload) if source == "intercom" and intercom is not None else None

    def handle(session: Session, event: InboxEvent, prepared=None) -> None:
        if event.source == "webchat":
            payload = event.payload
            text = keyring.decrypt(payload["text_enc"])
            result = Dialog(session, deps).handle(
                Incoming(conversation_key=event.conversation_key, channel="webchat", text=text,
                         locale=payload.get("locale"), ip=payload.get("ip")),
                turn=str(event.id))
            # Processed: keep only what the transcript keeps, so the plain text is not at rest.
            event.payload = {k: v for k, v in payload.items() if k != "text_enc"} | {
                "text_redacted": result.stored_text}
        elif event.source == "slack" and slack is not None:
            slack.handle(session, event)  # an approver's decision (bot/slack/decisions.py)
        elif event.source == "intercom" and intercom is not None:
            intercom.handle(session, event, prepared)  # bot/intercom/inbound.py
        else:
            raise ValueError(f"no handler for inbox source {event.source!r}")

    def give_up(session: Session, event: InboxEvent) -> None:
        """The event failed for the last time: an approver still waiting on their submission is told, and
        so is a customer whose message got no reply."""
        if event.source == "slack" and slack is not None:
            slack.give_up(session, event)
        elif event.source in ("webchat", "intercom"):
            Dialog(session, deps).not_handled(event.conversation_key, turn=str(event.id),
                                              locale=(event.payload or {}).get("locale"))

    def delayed(session: Session, event: InboxEvent) -> None:
        """The event's first attempt met a service that did not answer, and it waits to be tried again:
        a customer is told once that their message is waiting. (An approver's modal says "Recording…"
        until the outcome, and give_up tells them if there is none.)"""
        if event.source in ("webchat", "intercom"):
            Dialog(session, deps).delayed(event.conversation_key, turn=str(event.id),
                                          locale=(event.payload or {}).get("locale"))

    if intercom is not None:  # only Intercom events have network work to do before the transaction
        handle.prepare = prepare
    handle.give_up = give_up
    handle.delayed = delayed
    return handle
