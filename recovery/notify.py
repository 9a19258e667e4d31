"""Messages caused by case changes, written to the outbox in the caller's transaction.

The domain names a message (a template key plus context); `bot/` renders and sends it. Every email to
the owner carries a fresh "this wasn't me" cancel link.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy.orm import Session

from recovery import outbox
from recovery.crypto import Keyring, new_token, token_hash
from recovery.models import Case, LinkToken

CANCEL_LINK_DAYS = 30


class ChatWriter(Protocol):
    def write(self, session: Session, *, conversation: str, message: str, locale: str, buttons: list[str],
              context: dict, key: str, now: datetime) -> None:
        """Store the rendered reply in `session` (the caller's transaction). It commits together with what
        caused it, so it is written once; `key` identifies it."""


@dataclass
class Notifier:
    session: Session
    keyring: Keyring
    base_url: str
    now: datetime
    # conversation prefix -> a ChatWriter that stores replies in the caller's transaction
    chat_writers: dict = field(default_factory=dict)

    def _key(self, case: Case, what: str) -> str:
        # Unique per message. A message is only ever enqueued by a transaction that commits once, so a
        # random part is as good as a counter, and needs no query.
        return f"{case.id}:{what}:{uuid.uuid4().hex[:16]}"

    def cancel_url(self, case: Case, account_id: str | None) -> str:
        token = new_token()
        self.session.add(LinkToken(token_hash=token_hash(token), kind="cancel", case_id=case.id,
                                   account_id=account_id, created_at=self.now,
                                   expires_at=self.now + timedelta(days=CANCEL_LINK_DAYS)))
        return f"{self.base_url.rstrip('/')}/cancel/{token}"

    def lock_url(self, case: Case, account_id: str) -> str:
        """The completion email's "this wasn't me" link: its own action (a hold and an alert), once."""
        token = new_token()
        self.session.add(LinkToken(token_hash=token_hash(token), kind="lock", case_id=case.id,
                                   account_id=account_id, created_at=self.now,
                                   expires_at=self.now + timedelta(days=CANCEL_LINK_DAYS)))
        return f"{self.base_url.rstrip('/')}/lock/{token}"

    def email(self, case: Case, template: str, *, to: str | None, locale: str, account_id: str | None,
              with_cancel: bool = True, send: bool = True, **context) -> None:
        """Queue a templated email to the account's registered address (never one typed in chat).

        `send=False` makes a message that goes through every step of a real one (queued, dispatched,
        rendered) except the last: the mailer drops it instead of sending it. A stand-in case has no one
        to write to, and doing the same work as a real start keeps reply times from telling them apart.
        """
        context = dict(context, case_id=case.id)
        if with_cancel:
            context["cancel_url"] = self.cancel_url(case, account_id)
        outbox.enqueue(self.session, self.keyring, kind="email", key=self._key(case, f"email-{template}"),
                       now=self.now, payload={"template": template, "to": to, "locale": locale,
                                              "context": context, "suppress": not send})

    def chat(self, case: Case | None, conversation_key: str, message: str, *, locale: str,
             buttons: tuple[str, ...] = (), key: str | None = None, **context) -> None:
        if key is None:
            key = self._key(case, f"chat-{message}") if case else None
        writer = self.chat_writers.get(conversation_key.split(":", 1)[0])
        if writer is not None:
            # A channel whose transcript lives in our own database takes the reply in this transaction:
            # nothing needs sending, so no queue (and no email ahead of it) can delay it.
            writer.write(self.session, conversation=conversation_key, message=message, locale=locale,
                         buttons=list(buttons), context=context, key=key, now=self.now)
            return
        outbox.enqueue(self.session, self.keyring, kind="chat", key=key, now=self.now,
                       payload={"conversation": conversation_key, "message": message, "locale": locale,
                                "buttons": list(buttons), "context": context})

    def note(self, conversation_key: str, message: str, *, key: str, **context) -> None:
        """An internal note in a conversation, for the support team (Intercom); channels without people
        (the web chat) have no such thing, and the note is not written."""
        if conversation_key.split(":", 1)[0] in self.chat_writers:
            return
        outbox.enqueue(self.session, self.keyring, kind="chat", key=key, now=self.now,
                       payload={"conversation": conversation_key, "action": "note", "message": message,
                                "context": context})

    def staff(self, case: Case, event: str, **context) -> None:
        outbox.enqueue(self.session, self.keyring, kind="staff", key=self._key(case, f"staff-{event}"),
                       now=self.now, payload={"case_id": case.id, "event": event, "context": context})
