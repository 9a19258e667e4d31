"""Everything the bot holds about one account, as one JSON-able document, for a customer's access request.

It names nothing secret: no email code, link or token, TOTP secret or recovery code. Emails are listed
by template, address and time (their codes and links stay in the encrypted payload); documents by name,
type, size and SHA-256. Transcripts are what the bot keeps: the web chat's lines (masked as stored) and
the customer's words of Intercom events (Intercom keeps that conversation itself). Data already purged
(recovery/retention.py) is gone, and a case whose details were purged is no longer tied to the account.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import audit
from recovery.crypto import Keyring, UnreadableValue
from recovery.models import (Approval, Case, CaseCheck, CaseDocument, ChatMessage, Conversation, InboxEvent,
                             OutboxMessage, WithdrawalHold)

FORMAT = "recoverybot-account-export/1"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


def export_account(s: Session, *, account_id: str, keyring: Keyring, directory, now: datetime) -> dict:
    profile = directory.get(account_id)
    cases = list(s.scalars(select(Case).where(Case.account_id == account_id).order_by(Case.created_at)))
    return {
        "format": FORMAT,
        "account_id": account_id,
        "generated_at": _iso(now),
        "account": None if profile is None else {
            "email": profile.email, "locale": profile.locale, "created_at": _iso(profile.created_at),
            "totp_enabled": profile.totp_enabled, "facts": dict(profile.facts),
            "security_events": [{"type": e.type, "at": _iso(e.at)} for e in profile.events]},
        "cases": [_case(s, case, keyring) for case in cases],
        "withdrawal_holds": [{"case_id": h.case_id, "reason": h.reason, "placed_at": _iso(h.created_at),
                              "until": _iso(h.until)}
                             for h in s.scalars(select(WithdrawalHold).where(WithdrawalHold.account_id == account_id)
                                                .order_by(WithdrawalHold.created_at))],
    }


def _case(s: Session, case: Case, keyring: Keyring) -> dict:
    conversations = sorted({case.conversation_id, *s.scalars(select(Conversation.key)
                                                           .where(Conversation.case_id == case.id))} - {""})
    return {
        "id": case.id, "state": case.state, "channel": case.channel, "locale": case.locale,
        "opened_by": case.opened_by, "opened_at": _iso(case.created_at), "closed_at": _iso(case.closed_at),
        "reason": case.final_reason,
        "risk": {"level": case.risk_level, "reasons": list(case.risk_reasons or [])},
        "checks": [{"name": c.name, "result": c.result, "evidence": c.evidence, "at": _iso(c.updated_at)}
                   for c in s.scalars(select(CaseCheck).where(CaseCheck.case_id == case.id).order_by(CaseCheck.id))],
        "decisions": [{"approver": a.approver, "decision": a.decision, "reason": a.reason, "at": _iso(a.at)}
                      for a in s.scalars(select(Approval).where(Approval.case_id == case.id).order_by(Approval.at))],
        "history": [{"at": _iso(r.at), "event": r.event, "from": r.from_state, "to": r.to_state,
                     "actor": r.actor, "channel": r.channel, "reason": r.reason} for r in audit.trail(s, case.id)],
        "emails": _emails(s, case, keyring),
        "documents": [{"name": d.name, "content_type": d.content_type, "size": d.size, "sha256": d.sha256,
                       "received_at": _iso(d.received_at)}
                      for d in s.scalars(select(CaseDocument).where(CaseDocument.case_id == case.id)
                                         .order_by(CaseDocument.id))],
        "conversations": [_transcript(s, key) for key in conversations],
    }


def _emails(s: Session, case: Case, keyring: Keyring) -> list[dict]:
    out = []
    for m in s.scalars(select(OutboxMessage).where(OutboxMessage.case_id == case.id, OutboxMessage.kind == "email")
                       .order_by(OutboxMessage.id)):
        entry = {"queued_at": _iso(m.created_at), "sent_at": _iso(m.sent_at), "status": m.status}
        try:
            payload = keyring.decrypt_json(m.payload_enc)
            entry |= {"template": payload.get("template"), "to": payload.get("to")}
        except UnreadableValue:
            entry |= {"template": None, "unreadable": True}
        out.append(entry)
    return out


def _transcript(s: Session, key: str) -> dict:
    """The lines the bot keeps of one conversation, oldest first."""
    lines = []
    if key.startswith("webchat:"):
        lines = [{"at": _iso(m.created_at), "from": m.sender, "text": m.text}
                 for m in s.scalars(select(ChatMessage).where(ChatMessage.session_id == key.split(":", 1)[1])
                                    .order_by(ChatMessage.seq))]
    pending = 0
    if not key.startswith("webchat:"):  # the web chat's lines are already above
        for event in s.scalars(select(InboxEvent).where(InboxEvent.conversation_key == key)
                               .order_by(InboxEvent.id)):
            text = (event.payload or {}).get("text_redacted")
            if text is None:
                pending += 1  # not processed yet: only the encrypted event exists
            else:
                lines.append({"at": _iso(event.received_at), "from": "customer", "text": text})
    return {"conversation": key, "lines": lines, "not_yet_processed": pending}
