"""The worker's side of a stored Intercom event: who wrote it, what they uploaded, and one dialog turn.

`prepare` makes the two calls that go out, each bounded by a timeout, before the inbox transaction
opens (no database lock is held while Intercom answers): the contact lookup and the attachment downloads
(Intercom's upload URLs expire in 30 minutes, so waiting is not an option). A failed lookup does not
hold the customer up: the turn runs as for a lead, which only ever adds checks.

`handle` runs inside the inbox transaction (recovery.inbox.process_one), so the turn, its replies
(outbox), the stored uploads and the redacted event commit together, or not at all and the event is
tried again.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy.orm import Session

from bot.intercom import parse
from bot.intercom.client import Contact, DownloadRefused, IntercomApi, IntercomRefused, IntercomUnavailable
from bot.templates import pick_locale
from recovery import outbox
from recovery.deps import Deps
from recovery.dialog import Dialog, Incoming
from recovery.models import Case, CaseDocument, Conversation, InboxEvent

log = logging.getLogger(__name__)

MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Download:
    attachment: parse.Attachment
    content: bytes


class Prepared(NamedTuple):
    message: parse.Message | None
    contact: Contact | None
    downloads: list[Download]
    refused: int
    command: parse.StaffCommand | None = None
    initiator: str | None = None      # the approver id of the teammate who wrote the command


class IntercomInbound:
    def __init__(self, *, api: IntercomApi, deps: Deps, max_attachment_bytes: int = MAX_ATTACHMENT_BYTES,
                 trust_external_id: bool = False, staff=None):
        self.api, self.deps, self.max_attachment_bytes = api, deps, max_attachment_bytes
        self.staff = staff  # bot.staff.StaffDirectory: a teammate's approver id
        # Only under Intercom's identity verification is a contact's external_id proof of a login.
        self.trust_external_id = trust_external_id

    def prepare(self, payload: dict) -> Prepared:
        event = json.loads(self.deps.keyring.decrypt(payload["event_enc"]))
        command = parse.staff_command(event)
        if command is not None:
            initiator = self.staff.approver_id(command.admin_id, command.admin_email) if self.staff else None
            return Prepared(None, None, [], 0, command, initiator)
        message = parse.customer_message(event)
        if message is None:
            return Prepared(None, None, [], 0)
        return Prepared(message, self._contact(message.contact_id), *self._download(message.attachments))

    def handle(self, session: Session, event: InboxEvent, prepared: Prepared | None = None) -> None:
        payload = event.payload
        prepared = prepared or self.prepare(payload)
        message, contact, downloads, refused, command, initiator = prepared
        kept = {k: v for k, v in payload.items() if k != "event_enc"}
        if command is not None:
            Dialog(session, self.deps).staff_command(
                command.conversation_key, channel="intercom", verb=command.verb, email=command.email,
                initiator=initiator, teammate=command.admin_id, turn=str(event.id))
            event.payload = kept | {"staff_command": command.verb, "admin_id": command.admin_id}
            return
        if message is None:  # stored by an older version whose rules differed
            event.payload = kept | {"ignored": True}
            return
        result = Dialog(session, self.deps).handle(
            Incoming(conversation_key=message.conversation_key, channel="intercom", text=message.text,
                     locale=pick_locale(contact.language) if contact and contact.language else None,
                     verified_account_id=self._verified_account(session, contact),
                     meta={"contact_role": contact.role if contact else None,
                           "attachments": [d.attachment.name for d in downloads],
                           "attachments_refused": refused}),
            turn=str(event.id))
        self._keep(session, message.conversation_key, downloads)
        if result.secrets:
            # Our copy is redacted below; Intercom's copy too, where its API allows (outbox, retried).
            outbox.enqueue(session, self.deps.keyring, kind="chat", now=self.deps.clock.now(),
                           key=f"{message.conversation_key}:redact:{message.part_id}",
                           payload={"conversation": message.conversation_key, "action": "redact",
                                    "part_id": message.part_id, "part_kind": message.part_kind})
        # Processed: the raw event (the customer's words as sent) gives way to the redacted text.
        event.payload = kept | {"part_kind": message.part_kind, "text_redacted": result.stored_text,
                                "attachments": len(downloads), "secrets": list(result.secrets)}

    # ---- the contact -------------------------------------------------------------------------------

    def _contact(self, contact_id: str | None) -> Contact | None:
        if contact_id is None:
            return None
        try:
            return self.api.contact(contact_id)
        except (IntercomUnavailable, IntercomRefused) as exc:
            log.warning("contact lookup failed, treating the writer as a lead: %s", exc)
            return None

    def _verified_account(self, session: Session, contact: Contact | None) -> str | None:
        """The account of a signed-in user: Intercom role `user` whose external_id is one of our
        accounts. A lead, or a user id the directory does not know, is not verified."""
        if not self.trust_external_id or contact is None or contact.role != "user" or not contact.external_id:
            return None
        profile = self.deps.directory_for(session).get(contact.external_id)
        return profile.id if profile is not None else None

    # ---- uploads -----------------------------------------------------------------------------------

    def _download(self, attachments: tuple[parse.Attachment, ...]) -> tuple[list[Download], int]:
        downloads, refused = [], 0
        for a in attachments:
            if a.filesize is not None and a.filesize > self.max_attachment_bytes:
                refused += 1
                continue
            try:
                downloads.append(Download(a, self.api.download(a.url, max_bytes=self.max_attachment_bytes)))
            except DownloadRefused as exc:
                log.warning("attachment not kept (%s, %s): %s", a.content_type, a.filesize, exc)
                refused += 1
        return downloads, refused

    def _keep(self, session: Session, conversation_key: str, downloads: list[Download]) -> None:
        if not downloads:
            return
        conversation = session.get(Conversation, conversation_key)
        case_id = conversation.case_id if conversation is not None else None
        now = self.deps.clock.now()
        for d in downloads:
            session.add(CaseDocument(
                case_id=case_id, conversation_key=conversation_key, name=d.attachment.name,
                content_type=d.attachment.content_type, size=len(d.content),
                sha256=hashlib.sha256(d.content).hexdigest(),
                content_enc=self.deps.keyring.encrypt(base64.b64encode(d.content).decode("ascii")),
                received_at=now))
        case = session.get(Case, case_id) if case_id is not None else None
        if case is not None:  # the approvers see it in the card's thread (bot/slack/notifier.py)
            self.deps.notifier(session, now).staff(
                case, "document_added", documents=len(downloads))
