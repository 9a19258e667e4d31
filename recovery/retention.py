"""Retention: how long each kind of personal data is kept, and the purge that removes what is older.

Ages count from when a case reached a final state (`cases.closed_at`) or, for a conversation with no
open case, from its last activity: the newest of its messages, events and uploads, and the closing of
any case it had. Nothing tied to an open case is touched.

What a purge removes, by kind:
- transcripts: the dialog state of a conversation, the web chat session and every line of it;
- documents: uploaded files (name, bytes and hash);
- events: inbox events once processed (or given up), outbox messages once sent (or dead);
- cases: a final case's personal details: account id, conversation, free-text reasons (the case's and
  its approvers'), check evidence, email code hashes, links, timers, the Slack card's location.

The case row itself stays with its id, states, risk level and times, and the audit log is not touched:
its records hold no personal data (recovery/audit.py), so the chain still verifies.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, Iterator

from sqlalchemy import String, delete, func, literal, literal_column, or_, select, text, union_all, update
from sqlalchemy.orm import Session

from recovery import audit
from recovery.inbox import MAX_ATTEMPTS
from recovery.machine import OPEN
from recovery.models import (Approval, Case, CaseCheck, CaseDocument, ChatMessage, ChatSession, Conversation,
                             EmailCode, InboxEvent, LinkToken, OutboxMessage, PurgeRun, SlackCard, Timer)

KINDS = ("transcripts", "documents", "events", "cases")
BATCH = 500  # ids per statement and per transaction: short locks on a busy database
WEBCHAT = "webchat:"
PURGE_EVERY = timedelta(days=1)
RUN_TIMEOUT = timedelta(hours=1)  # an unfinished run older than this has died; the worker tries again


@dataclass(frozen=True)
class Retention:
    """Days each kind is kept after its case (or conversation) became final."""
    transcripts: int
    documents: int
    events: int
    cases: int

    def cutoff(self, kind: str, now: datetime) -> datetime:
        return now - timedelta(days=getattr(self, kind))

    def describe(self) -> str:
        return ", ".join(f"{kind} {getattr(self, kind)}" for kind in KINDS)


@dataclass
class Plan:
    """What a purge at `now` removes. `oldest` is, per kind, the earliest final time among what is past
    its retention: how overdue the purge is."""
    transcripts: list[str] = field(default_factory=list)     # conversation keys
    chat_sessions: list[str] = field(default_factory=list)   # web chat session ids among them
    chat_lines: int = 0
    documents: list[int] = field(default_factory=list)
    inbox: list[int] = field(default_factory=list)
    outbox: list[int] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    oldest: dict[str, datetime] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"transcripts": len(self.transcripts), "documents": len(self.documents),
                "events": len(self.inbox) + len(self.outbox), "cases": len(self.cases)}

    def empty(self) -> bool:
        return not any(self.counts().values())

    def saw(self, kind: str, final: datetime) -> None:
        if kind not in self.oldest or final < self.oldest[kind]:
            self.oldest[kind] = final


def _chunks(items: Iterable, size: int = BATCH) -> Iterator[list]:
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---- what is past retention ------------------------------------------------------------------------

def _held_open(s: Session) -> set[str]:
    """Conversation keys that an open case is tied to: its own conversation, and any conversation whose
    dialog points at it (a logged-in customer may have moved the case to a new conversation)."""
    rows = s.execute(select(Case.id, Case.conversation_id).where(Case.state.in_([st.value for st in OPEN]))).all()
    held = {conversation for _, conversation in rows}
    for ids in _chunks(case_id for case_id, _ in rows):
        held.update(s.scalars(select(Conversation.key).where(Conversation.case_id.in_(ids))))
    return held


def _activity(s: Session) -> tuple[dict[str, datetime], dict[str, set[str]]]:
    """Each conversation's last activity, and which tables hold something of it."""
    def webchat(column):
        return literal_column(f"'{WEBCHAT}'", String) + column

    parts = (
        select(Conversation.key, literal("conversation"), Conversation.updated_at),
        select(webchat(ChatSession.id), literal("chat_session"), ChatSession.created_at),
        select(webchat(ChatMessage.session_id), literal("chat_message"), func.max(ChatMessage.created_at))
        .group_by(ChatMessage.session_id),
        select(InboxEvent.conversation_key, literal("inbox"), func.max(InboxEvent.received_at))
        .group_by(InboxEvent.conversation_key),
        select(CaseDocument.conversation_key, literal("document"), func.max(CaseDocument.received_at))
        .group_by(CaseDocument.conversation_key),
        select(Case.conversation_id, literal("case"), func.max(Case.closed_at))
        .where(Case.closed_at.is_not(None)).group_by(Case.conversation_id),
        select(Conversation.key, literal("case"), Case.closed_at)
        .join(Case, Case.id == Conversation.case_id).where(Case.closed_at.is_not(None)),
    )
    last: dict[str, datetime] = {}
    sources: dict[str, set[str]] = defaultdict(set)
    for key, source, at in s.execute(union_all(*parts)):
        if not key or at is None:
            continue
        sources[key].add(source)
        if key not in last or at > last[key]:
            last[key] = at
    return last, sources


def plan(s: Session, retention: Retention, now: datetime) -> Plan:
    """Find everything past its retention; changes nothing."""
    held = _held_open(s)
    last, sources = _activity(s)
    p = Plan()

    def conversation_final(key: str | None, own_time: datetime) -> datetime | None:
        """When the conversation became final (None while an open case holds it); a conversation that
        left nothing else behind counts from the row's own time."""
        if key is None:
            return own_time
        return None if key in held else last.get(key, own_time)

    cut = retention.cutoff("transcripts", now)
    for key, at in sorted(last.items()):
        if key not in held and at <= cut and sources[key] & {"conversation", "chat_session", "chat_message"}:
            p.transcripts.append(key)
            p.saw("transcripts", at)
            if key.startswith(WEBCHAT) and sources[key] & {"chat_session", "chat_message"}:
                p.chat_sessions.append(key[len(WEBCHAT):])
    for ids in _chunks(p.chat_sessions):
        p.chat_lines += s.scalar(select(func.count()).where(ChatMessage.session_id.in_(ids)))

    cut = retention.cutoff("documents", now)
    for doc_id, case_id, key, received, closed in s.execute(
            select(CaseDocument.id, CaseDocument.case_id, CaseDocument.conversation_key,
                   CaseDocument.received_at, Case.closed_at)
            .outerjoin(Case, Case.id == CaseDocument.case_id).order_by(CaseDocument.id)):
        # a case's file goes with its case; a file sent before any case, with its conversation
        final = closed if case_id else conversation_final(key, received)
        if final is not None and final <= cut:
            p.documents.append(doc_id)
            p.saw("documents", final)

    cut = retention.cutoff("events", now)
    for event_id, key, received in s.execute(
            select(InboxEvent.id, InboxEvent.conversation_key, InboxEvent.received_at)
            .where(or_(InboxEvent.processed_at.is_not(None), InboxEvent.attempts >= MAX_ATTEMPTS))
            .order_by(InboxEvent.id)):
        final = conversation_final(key, received)
        if final is not None and final <= cut:
            p.inbox.append(event_id)
            p.saw("events", final)
    for message_id, case_id, key, queued, sent, case_state, closed in s.execute(
            select(OutboxMessage.id, OutboxMessage.case_id, OutboxMessage.conversation_key,
                   OutboxMessage.created_at, OutboxMessage.sent_at, Case.state, Case.closed_at)
            .outerjoin(Case, Case.id == OutboxMessage.case_id)
            .where(OutboxMessage.status.in_(("sent", "dead"))).order_by(OutboxMessage.id)):
        # final once everything it belongs to is: its case (when that still exists) and its conversation
        own = sent or queued
        times = [own]
        if case_state is not None:
            times.append(closed)
        if key is not None:
            times.append(conversation_final(key, own))
        final = None if None in times else max(times)
        if final is not None and final <= cut:
            p.outbox.append(message_id)
            p.saw("events", final)

    for case_id, closed in s.execute(select(Case.id, Case.closed_at)
                                     .where(Case.closed_at <= retention.cutoff("cases", now),
                                            Case.details_purged_at.is_(None)).order_by(Case.closed_at)):
        p.cases.append(case_id)
        p.saw("cases", closed)
    return p


def overdue(p: Plan, retention: Retention, now: datetime) -> dict[str, float]:
    """Per kind, how many seconds the oldest data past its retention has been overdue (0 when none)."""
    return {kind: max(0.0, (retention.cutoff(kind, now) - p.oldest[kind]).total_seconds())
            if kind in p.oldest else 0.0 for kind in KINDS}


# ---- removing it ---------------------------------------------------------------------------------------

def apply(db, p: Plan, retention: Retention, now: datetime) -> None:
    """Remove what the plan found, a batch per transaction. Each statement re-checks the condition that
    put a row in the plan, so a row that came back to life since (a late message) is left alone."""
    for ids in _chunks(p.chat_sessions):
        with db.transaction() as s:
            s.execute(delete(ChatMessage).where(ChatMessage.session_id.in_(ids)))
            s.execute(delete(ChatSession).where(ChatSession.id.in_(ids)))
    for keys in _chunks(p.transcripts):
        with db.transaction() as s:
            s.execute(delete(Conversation).where(Conversation.key.in_(keys),
                                                 Conversation.updated_at <= retention.cutoff("transcripts", now)))
    for ids in _chunks(p.documents):
        with db.transaction() as s:
            s.execute(delete(CaseDocument).where(CaseDocument.id.in_(ids)))
    for ids in _chunks(p.inbox):
        with db.transaction() as s:
            s.execute(delete(InboxEvent).where(InboxEvent.id.in_(ids), or_(
                InboxEvent.processed_at.is_not(None), InboxEvent.attempts >= MAX_ATTEMPTS)))
    for ids in _chunks(p.outbox):
        with db.transaction() as s:
            s.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids),
                                                  OutboxMessage.status.in_(("sent", "dead"))))
    for ids in _chunks(p.cases):
        with db.transaction() as s:
            s.execute(update(Case).where(Case.id.in_(ids), Case.closed_at.is_not(None))
                      .values(account_id=None, conversation_id="", final_reason=None, owner_contact_enc=None,
                              details_purged_at=now))
            s.execute(update(CaseCheck).where(CaseCheck.case_id.in_(ids)).values(evidence={}))
            s.execute(update(Approval).where(Approval.case_id.in_(ids)).values(reason=None))
            for model in (EmailCode, LinkToken, Timer, SlackCard):
                s.execute(delete(model).where(model.case_id.in_(ids)))
    if not p.empty():
        db.scrub()


@dataclass(frozen=True)
class PurgeResult:
    counts: dict[str, int]
    chat_lines: int
    inbox: int
    outbox: int
    run_id: int | None = None


def purge(db, retention: Retention, now: datetime, *, trigger: str, dry_run: bool = False,
          run_id: int | None = None) -> PurgeResult:
    """Plan, and unless `dry_run`, remove, record the run and audit it. `run_id` is a run the caller
    already claimed (the worker's daily run)."""
    with db.transaction() as s:
        p = plan(s, retention, now)
    result = PurgeResult(p.counts(), p.chat_lines, len(p.inbox), len(p.outbox), run_id)
    if dry_run:
        return result
    if run_id is None:
        run_id = _claim(db, trigger, now)
    apply(db, p, retention, now)
    counts = result.counts
    with db.transaction() as s:
        run = s.get(PurgeRun, run_id)
        run.finished_at = now
        run.transcripts, run.documents, run.events, run.cases = (counts[k] for k in KINDS)
        audit.append(s, case_id=audit.NO_CASE, event="purge", from_state=None, to_state=None, actor="system",
                     channel=trigger, at=now,
                     reason=" ".join(f"{k}={counts[k]}" for k in KINDS) + f" (days: {retention.describe()})")
    return PurgeResult(counts, p.chat_lines, len(p.inbox), len(p.outbox), run_id)


def _claim(db, trigger: str, now: datetime, *, daily: bool = False) -> int | None:
    """Record the start of a run. With `daily`, only when no run finished in the last day and none is
    under way (started in the last hour, unfinished); the check and the insert are one transaction under
    a lock, so two workers never both run."""
    with db.transaction() as s:
        if db.is_postgres:
            s.execute(text("SELECT pg_advisory_xact_lock(9137002)"))
        if daily:
            finished = s.scalar(select(func.max(PurgeRun.finished_at)))
            running = s.scalar(select(func.max(PurgeRun.started_at)).where(PurgeRun.finished_at.is_(None)))
            if (finished is not None and finished > now - PURGE_EVERY) or (
                    running is not None and running > now - RUN_TIMEOUT):
                return None
        run = PurgeRun(trigger=trigger, started_at=now, transcripts=0, documents=0, events=0, cases=0)
        s.add(run)
        s.flush()
        return run.id


def purge_if_due(db, retention: Retention, now: datetime) -> PurgeResult | None:
    """The worker's daily run: purge unless a run (of any trigger) started in the last day."""
    run_id = _claim(db, "worker", now, daily=True)
    if run_id is None:
        return None
    return purge(db, retention, now, trigger="worker", run_id=run_id)
