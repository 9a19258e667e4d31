"""The inbox: inbound events stored once under their delivery key before they are acknowledged.

The worker takes them in order per conversation: an event is only claimed when no older event of the
same conversation is still waiting, and on PostgreSQL rows are locked with SKIP LOCKED so several
workers share the queue without processing one event twice.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from functools import cache
from typing import Callable

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session, aliased

from recovery.db import insert_new, is_outage
from recovery.errors import DirectoryUnavailable
from recovery.models import InboxEvent

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 5
# A lost connection says nothing about the event being handled (the database restarted), so it uses up
# no attempt. The same event losing it again and again is the event's doing (say, a statement that
# crashes its server process): after this many times in a row, the next claim counts an attempt instead
# of handling it, so such an event is parked like any other failing one rather than retried forever.
CUT_OFF_LIMIT = 3
_cut_off: dict[tuple[str, int], int] = {}  # (database, event id) -> lost connections in a row
_cut_off_lock = threading.Lock()
# An event that failed because another service did not answer waits this long before its next attempt, by
# attempts used so far, instead of being retried at once: a few seconds of outage would otherwise use up
# all its attempts, and the customer's message would never be answered. That is a DirectoryUnavailable
# from the handler (the account API refused the connection, timed out, or answered 5xx or 429), or any
# failure of a `prepare` step (its network calls, e.g. a Slack look-up). Its conversation waits behind it
# (order is kept); others go on. The last attempt comes about 5 minutes after the first failure. Other
# failures (a bug, bad data, a refused token) are retried at once: waiting would not change them.
OUTAGE_RETRY_SECONDS = (5, 15, 60, 240)


def add(session: Session, *, source: str, delivery_key: str, conversation_key: str, payload: dict,
        now: datetime) -> bool:
    """Add the event in the caller's transaction; False when that delivery key is already stored.

    One INSERT ... ON CONFLICT DO NOTHING: no look-up first, and a redelivery racing the first delivery
    waits for it and then inserts nothing, instead of failing on the unique key."""
    statement = insertion(session.get_bind().dialect.name, source=source, delivery_key=delivery_key,
                          conversation_key=conversation_key, payload=payload, now=now)
    return session.execute(statement).scalar() is not None


def insertion(dialect: str, *, source: str, delivery_key: str, conversation_key: str, payload: dict,
              now: datetime):
    """The statement `add` runs, returning the new id (none for a delivery key already stored), for a
    caller that runs it on a connection of its own."""
    return (insert_new(dialect, InboxEvent, InboxEvent.delivery_key)
            .values(delivery_key=delivery_key, source=source, conversation_key=conversation_key, payload=payload,
                    received_at=now, attempts=0)
            .returning(InboxEvent.__table__.c.id))


def store(db, **fields) -> bool:
    """Store the event in its own transaction; False for a redelivery."""
    with db.transaction() as session:
        return add(session, **fields)


Handler = Callable[..., None]


@cache
def _eligible():
    """The oldest event that is the oldest still waiting in its own conversation. Built once (and so
    are the variants below): statements are immutable, and building this one (an aliased entity) cost
    0.6 ms, a tenth of a web-chat event, plus its cache key at each execution. MAX_ATTEMPTS is a constant.

    Written as "its id is its conversation's smallest waiting id" rather than "no older event waits":
    the planner turns NOT EXISTS into an anti-join and, trusting statistics that say the queue is empty,
    reads every waiting event for each candidate. This scalar subquery stays a per-candidate probe of a
    partial index of waiting events (by conversation, once statistics show a backlog), and the outer scan
    walks the waiting events in id order, so processed history is never read (tests/test_claims.py).
    """
    first = aliased(InboxEvent)
    oldest_in_conversation = (select(func.min(first.id))
                              .where(first.conversation_key == InboxEvent.conversation_key,
                                     first.processed_at.is_(None), first.attempts < MAX_ATTEMPTS)
                              .scalar_subquery())
    return (select(InboxEvent).where(*_due(), InboxEvent.id == oldest_in_conversation)
            .order_by(InboxEvent.id).limit(1))


def _due() -> tuple:
    """An event still waiting (not processed, attempts left) and not held back past `now` (bound)."""
    return (InboxEvent.processed_at.is_(None), InboxEvent.attempts < MAX_ATTEMPTS,
            or_(InboxEvent.retry_at.is_(None), InboxEvent.retry_at <= bindparam("now")))


@cache
def _claim(locking: bool):
    """The next eligible event, row-locked with SKIP LOCKED when `locking` (PostgreSQL)."""
    query = _eligible()
    return query.with_for_update(skip_locked=True, of=InboxEvent) if locking else query


@cache
def _peek(locking: bool):
    """What `prepare` needs of the next eligible event. Columns, not the entity: this read needs no ORM
    identity and it runs once per event."""
    query = _eligible().with_only_columns(InboxEvent.id, InboxEvent.source, InboxEvent.payload)
    return query.with_for_update(skip_locked=True, of=InboxEvent) if locking else query


@cache
def _claim_peeked(locking: bool):
    """The event a peek found (bound as `wanted`), if it is still waiting and due."""
    query = select(InboxEvent).where(InboxEvent.id == bindparam("wanted"), *_due())
    return query.with_for_update(skip_locked=True, of=InboxEvent) if locking else query


def process_one(db, handler: Handler, now_fn) -> bool:
    """Process the next eligible event in its own transaction; False when there is none.

    A handler with a `prepare(source, payload)` attribute gets to do its network calls (say, a contact
    lookup) first, with no transaction open, so no lock is held while waiting on another service;
    `handler(session, event, prepared)` then runs in the transaction. A handler with a
    `give_up(session, event)` attribute is called when an event fails for the last time.
    """
    prepare = getattr(handler, "prepare", None)
    prepared, wanted = None, None
    if prepare is not None:
        # On PostgreSQL the peek skips what another worker holds: an unlocked peek would see the event
        # that worker is processing, fail to claim it below, and peek it again, spinning until that
        # worker commits (two workers then drained no faster than one). The lock ends with this short
        # transaction, so two workers can still peek the same event; the locked claim below decides
        # which one processes it, and the other only wasted its `prepare`. The peek is rolled back, not
        # committed: a commit of a transaction that locked a row waits for a WAL flush.
        with db.reading() as session:
            peek = session.execute(_peek(db.is_postgres), {"now": now_fn()}).first()
            if peek is None:
                return False
            wanted, source, payload = peek.id, peek.source, dict(peek.payload)
        try:
            prepared = prepare(source, payload)
        except Exception as exc:  # noqa: BLE001 - another service failing must not stop the queue
            if is_outage(exc):
                raise
            # Counted and held back like an unanswered account API; before, the pass failed and the next
            # one peeked the same event first, so one failing look-up held up every conversation.
            log.exception("inbox event %s: its preparation failed", wanted)
            with db.transaction() as session:
                event = session.scalar(_claim_peeked(db.is_postgres), {"now": now_fn(), "wanted": wanted})
                if event is not None:  # else another worker holds it, or it is already done
                    _failed(session, event, f"{type(exc).__name__}: {exc}", handler, hold_from=now_fn())
            return True
    query, params = _claim(db.is_postgres), {"now": now_fn()}
    if wanted is not None:
        query, params["wanted"] = _claim_peeked(db.is_postgres), wanted
    event_id = None
    try:
        with db.transaction() as session:
            event = session.scalar(query, params)
            if event is None:
                return wanted is not None  # another worker took the peeked event: try the next
            event_id = event.id
            cut_off = _cut_off_count(db, event_id)
            if cut_off >= CUT_OFF_LIMIT:
                _failed(session, event, f"its handling lost the database connection {cut_off} times in a row",
                        handler)
                _forget_cut_off(db, event_id)
                return True
            if prepare is not None:
                handler(session, event, prepared)
            else:
                handler(session, event)
            event.processed_at = now_fn()
        _forget_cut_off(db, event_id)
        return True
    except Exception as exc:  # noqa: BLE001 - a poisoned event must not stop the queue
        if event_id is None or is_outage(exc):
            # The database going away (a restart) says nothing about the event: it was not processed, and
            # must not use up its attempts; the worker's pass fails and is retried shortly. An error of the
            # event's own making (a statement timeout, a deadlock) still counts as an attempt.
            if event_id is not None:
                with _cut_off_lock:
                    _cut_off[(db.url, event_id)] = _cut_off.get((db.url, event_id), 0) + 1
            raise
        log.exception("inbox event %s failed", event_id)
        with db.transaction() as session:
            _failed(session, session.get(InboxEvent, event_id), f"{type(exc).__name__}: {exc}", handler,
                    hold_from=now_fn() if isinstance(exc, DirectoryUnavailable) else None)
        return True


def _failed(session: Session, event: InboxEvent, error: str, handler, *,
            hold_from: datetime | None = None) -> None:
    """Count a failed attempt. With `hold_from` (another service did not answer), the next attempt waits
    OUTAGE_RETRY_SECONDS from then, and on the first such failure the sender is told it is waiting (the
    handler's `delayed`: a customer). On the last attempt, whoever sent the event is told that nothing
    came of it (the handler's `give_up`: a Slack approver, a customer)."""
    event.attempts += 1
    event.last_error = error[:2000]
    if hold_from is not None and event.attempts < MAX_ATTEMPTS:
        wait = OUTAGE_RETRY_SECONDS[min(event.attempts, len(OUTAGE_RETRY_SECONDS)) - 1]
        event.retry_at = hold_from + timedelta(seconds=wait)
        if event.attempts == 1:
            _tell(session, event, handler, "delayed")
    if event.attempts >= MAX_ATTEMPTS:
        _tell(session, event, handler, "give_up")


def _tell(session: Session, event: InboxEvent, handler, hook: str) -> None:
    """Run the handler's `hook(session, event)`, if it has one, in a savepoint: the attempt must be
    counted all the same when telling fails."""
    tell = getattr(handler, hook, None)
    if tell is None:
        return
    try:
        with session.begin_nested():
            tell(session, event)
    except Exception:  # noqa: BLE001 - see above
        log.exception("inbox event %s: %s failed too", event.id, hook)


def _cut_off_count(db, event_id: int) -> int:
    with _cut_off_lock:
        return _cut_off.get((db.url, event_id), 0)


def _forget_cut_off(db, event_id: int) -> None:
    with _cut_off_lock:
        _cut_off.pop((db.url, event_id), None)
