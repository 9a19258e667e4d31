"""Staff notifications through Slack: the outbox sender for kind "staff" when Slack is configured.

The card is posted once per case and afterwards re-rendered from the database with chat.update;
every other case event goes to the card's thread, and so do the customer's uploaded documents (each
uploaded once, decrypted only in memory).
"""
from __future__ import annotations

import base64
import logging

from slack_sdk.errors import SlackApiError
from sqlalchemy import select, update

from bot.slack import card
from recovery.machine import State
from recovery.models import AuditRecord, Case, CaseDocument, SlackCard
from recovery.outbox import Outgoing, PermanentFailure

log = logging.getLogger(__name__)

CARD_EVENTS = {"approval_recorded", "approved", "denied", "cancelled", "expired", "locked", "rejected",
               "completed"}
DOCUMENT_ADDED = "document_added"
PERMANENT_ERRORS = ("channel_not_found", "not_in_channel", "is_archived", "invalid_blocks", "missing_scope")


class CardNotPostedYet(Exception):
    """A case event came before its card's location was saved: another worker is still posting the card.
    Raised so the outbox tries again later (and parks the message as dead if the card never appears)."""


class SlackStaffNotifier:
    def __init__(self, *, db, deps, renderer, client, channel: str, security_ids, conversation_url=None):
        self.db, self.deps, self.renderer, self.client = db, deps, renderer, client
        self.channel, self.security_ids = channel, tuple(security_ids)
        self.conversation_url = conversation_url or (lambda case: None)

    def send(self, message: Outgoing) -> None:
        p = message.payload
        try:
            self._send(p["case_id"], p["event"], p.get("context", {}), owner=f"outbox:{message.id}")
        except SlackApiError as exc:
            _raise_refusal(exc, p["event"])

    def _send(self, case_id: str, event: str, context: dict, *, owner: str) -> None:
        with self.db.transaction() as s:
            case = s.get(Case, case_id)
            existing = s.get(SlackCard, case_id)
            data = None if event == DOCUMENT_ADDED else card.render(
                self.renderer, s, self.deps, case, conversation_url=self.conversation_url(case))
            where = (existing.channel, existing.message_ts) if existing else None
            card_expected = where is None and event != DOCUMENT_ADDED and _reached_approval(s, case_id)
        if event == "approval_requested":
            if where is None:
                where = self._post_card(case_id, data)
            else:
                self._update(where, data)
            self._upload_documents(case_id, where, owner)
            return
        if where is None:
            if card_expected:
                raise CardNotPostedYet(f"case {case_id} has no card yet for {event}; trying again later")
            # The case never reached approval: nothing in Slack to tell. A document that arrives before
            # the card is uploaded by the card's own message, right after posting it.
            return
        if event == DOCUMENT_ADDED:
            self._upload_documents(case_id, where, owner)
            return
        if event in CARD_EVENTS:
            self._update(where, data)
        if event == "approval_reminder":
            text = self._text("reminder", case_id, context)
        elif event == "approval_escalation":
            text = self._text("escalation", case_id, context, security_ids=self.security_ids)
        else:
            text = self._text("thread_event", case_id, context, event=event)
        self.client.chat_postMessage(channel=where[0], thread_ts=where[1], text=text,
                                     reply_broadcast=event == "approval_escalation")

    def _text(self, block: str, case_id: str, context: dict, **extra) -> str:
        context = {k: card.escape(v) if isinstance(v, str) else v for k, v in context.items()}
        return self.renderer.block(card.TEMPLATE, block, dict(case_id=case_id, context=context, **extra))

    def _post_card(self, case_id: str, data: card.CardData) -> tuple[str, str]:
        resp = self.client.chat_postMessage(channel=self.channel, text=data.text, blocks=data.blocks,
                                            unfurl_links=False, unfurl_media=False)
        now = self.deps.clock.now()
        with self.db.transaction() as s:
            row = s.get(SlackCard, case_id)
            if row is None:
                row = SlackCard(case_id=case_id, channel=resp["channel"], message_ts=resp["ts"],
                                posted_at=now, updated_at=now)
                s.add(row)
            return row.channel, row.message_ts

    def _update(self, where: tuple[str, str], data: card.CardData) -> None:
        self.client.chat_update(channel=where[0], ts=where[1], text=data.text, blocks=data.blocks)
        with self.db.transaction() as s:
            s.execute(update(SlackCard).where(SlackCard.case_id == data.case.id)
                      .values(updated_at=self.deps.clock.now()))

    # ---- documents ------------------------------------------------------------------------------------

    def _upload_documents(self, case_id: str, where: tuple[str, str], owner: str) -> None:
        """Upload the case's documents that are not in Slack yet into the card's thread.

        Each is claimed first for this outbox message (`owner`), so two workers never upload the same one;
        a claim left by an earlier, failed try of the same message is taken over by its retry.
        """
        with self.db.transaction() as s:
            ids = list(s.scalars(select(CaseDocument.id).where(CaseDocument.case_id == case_id,
                                                               *_unclaimed(owner)).order_by(CaseDocument.id)))
        for doc_id in ids:
            self._upload(doc_id, where, owner)

    def _upload(self, doc_id: int, where: tuple[str, str], owner: str) -> None:
        with self.db.transaction() as s:
            claimed = s.execute(update(CaseDocument).where(CaseDocument.id == doc_id, *_unclaimed(owner))
                                .values(slack_claim=owner)).rowcount == 1
            if not claimed:
                return  # another message is uploading it, or has uploaded it
            doc = s.get(CaseDocument, doc_id)
            name, sealed = doc.name or "document", doc.content_enc
            comment = self.renderer.block(card.TEMPLATE, "thread_document", dict(
                name=card.escape(doc.name), content_type=card.escape(doc.content_type), size=doc.size,
                sha256=doc.sha256))
        try:
            resp = self.client.files_upload_v2(channel=where[0], thread_ts=where[1], filename=name, title=name,
                                               initial_comment=comment,
                                               content=base64.b64decode(self.deps.keyring.decrypt(sealed)))
        except Exception:
            with self.db.transaction() as s:  # let any message try again
                s.execute(update(CaseDocument).where(CaseDocument.id == doc_id, CaseDocument.slack_claim == owner)
                          .values(slack_claim=None))
            raise
        file_id = str((resp.get("file") or {}).get("id") or "uploaded")[:64]
        with self.db.transaction() as s:
            s.execute(update(CaseDocument).where(CaseDocument.id == doc_id, CaseDocument.slack_file_id.is_(None))
                      .values(slack_file_id=file_id))


class ApproverMessages:
    """The outbox sender for kind "slack": what one approver's submission came to (bot/slack/decisions.py),
    as an ephemeral message in the card's channel, next to the card. Where Slack cannot show it there (the
    approver is not, or no longer, in that channel), it goes to them directly, in the app's messages."""

    NOT_THERE = ("user_not_in_channel", "channel_not_found", "not_in_channel", "is_archived")

    def __init__(self, client):
        self.client = client

    def send(self, message: Outgoing) -> None:
        p = message.payload
        try:
            try:
                self.client.chat_postEphemeral(channel=p["channel"], user=p["user"], text=p["text"])
            except SlackApiError as exc:
                if _error(exc) not in self.NOT_THERE:
                    raise
                self.client.chat_postMessage(channel=p["user"], text=p["text"])
        except SlackApiError as exc:
            _raise_refusal(exc, f"the message to {p['user']}")


def _error(exc: SlackApiError) -> str | None:
    return exc.response.get("error") if hasattr(exc.response, "get") else None


def _raise_refusal(exc: SlackApiError, what: str) -> None:
    """Re-raise a failed Slack call for the outbox: as PermanentFailure when trying again cannot help (a
    4xx other than 429, or a permanent error code), so the message is parked; as itself otherwise."""
    status, error = getattr(exc.response, "status_code", 0), _error(exc)
    if 400 <= status < 500 and status != 429 or error in PERMANENT_ERRORS:
        raise PermanentFailure(f"Slack refused {what}: {error or status}") from None
    raise exc


def _unclaimed(owner: str) -> tuple:
    return (CaseDocument.slack_file_id.is_(None),
            CaseDocument.slack_claim.is_(None) | (CaseDocument.slack_claim == owner))


def _reached_approval(session, case_id: str) -> bool:
    """Whether the case ever entered awaiting_approval, so that it has (or is getting) a card."""
    return session.scalar(select(AuditRecord.id).where(AuditRecord.case_id == case_id,
                                                       AuditRecord.to_state == State.AWAITING_APPROVAL.value)
                          .limit(1)) is not None
