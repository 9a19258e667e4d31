"""The inbox: inbound events stored once under their delivery key before they are acknowledged.

The worker takes them in order per conversation: an event is only claimed when no older event of the
same conversation is still waiting, and on PostgreSQL rows are locked with SKIP LOCKED so several
workers share the queue without processing one event twice.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Callable

from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from recovery.models import InboxEvent

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 5


def add(session: Session, *, source: str, delivery_key: str, conversation_key: str, payload: dict,
        now: datetime) -> bool:
    """Add the event in the caller's transaction; False when that delivery key is already stored."""
    if session.scalar(select(InboxEvent.id).where(InboxEvent.delivery_key == delivery_key)):
        return False
    session.add(InboxEvent(delivery_key=delivery_key, source=source, conversation_key=conversation_key,
                           payload=payload, received_at=now))
    session.flush()
    return True


def store(db, **fields) -> bool:
    """Store the event in its own transaction; False for a redelivery."""
    try:
        with db.transaction() as session:
            return add(session, **fields)
    except IntegrityError:  # two deliveries racing: the unique key lets exactly one in
        return False


Handler = Callable[..., None]


def _eligible():
    earlier = aliased(InboxEvent)
    return (select(InboxEvent)
            .where(InboxEvent.processed_at.is_(None), InboxEvent.attempts < MAX_ATTEMPTS,
                   ~exists().where(earlier.conversation_key == InboxEvent.conversation_key,
                                   earlier.processed_at.is_(None), earlier.attempts < MAX_ATTEMPTS,
                                   earlier.id < InboxEvent.id))
            .order_by(InboxEvent.id).limit(1))


def process_one(db, handler: Handler, now_fn) -> bool:
    """Process the next eligible event in its own transaction; False when there is none.

    A handler with a `prepare(source, payload)` attribute gets to do its network calls (say, a contact
    lookup) first, with no transaction open, so no lock is held while waiting on another service;
    `handler(session, event, prepared)` then runs in the transaction.
    """
    prepare = getattr(handler, "prepare", None)
    prepared, wanted = None, None
    if prepare is not None:
        with db.transaction() as session:
            peek = session.scalar(_eligible())
            if peek is None:
                return False
            wanted, source, payload = peek.id, peek.source, dict(peek.payload)
        prepared = prepare(source, payload)
    query = _eligible() if wanted is None else select(InboxEvent).where(
        InboxEvent.id == wanted, InboxEvent.processed_at.is_(None))
    if db.is_postgres:
        query = query.with_for_update(skip_locked=True, of=InboxEvent)
    event_id = None
    try:
        with db.transaction() as session:
            event = session.scalar(query)
            if event is None:
                return wanted is not None  # another worker took the peeked event: try the next
            event_id = event.id
            if prepare is not None:
                handler(session, event, prepared)
            else:
                handler(session, event)
            event.processed_at = now_fn()
        return True
    except Exception as exc:  # noqa: BLE001 - a poisoned event must not stop the queue
        if event_id is None:
            raise
        log.exception("inbox event %s failed", event_id)
        with db.transaction() as session:
            event = session.get(InboxEvent, event_id)
            event.attempts += 1
            event.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        return True
