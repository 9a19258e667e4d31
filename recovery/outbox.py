"""The outbox: side effects written in the same transaction as the state change, sent afterwards.

The dispatcher leases ready rows (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so any number of workers can
run), sends them outside any transaction, then records the outcome. A worker killed mid-send leaves a
lease that expires, and another pass sends the message again: delivery is at least once, and each
message carries its idempotency key so receivers that can dedupe do.
"""
from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from recovery.crypto import Keyring
from recovery.models import OutboxMessage

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=120)
MAX_ATTEMPTS = 8
BACKOFF_BASE = 2.0       # seconds; doubles each attempt
BACKOFF_CAP = 15 * 60


@dataclass(frozen=True)
class Outgoing:
    id: int
    kind: str
    idempotency_key: str
    payload: dict
    attempt: int


@dataclass(frozen=True)
class Lane:
    """A share of the outbox that one loop dispatches, so a slow receiver (an SMTP server) never
    holds up messages of other kinds (a chat reply)."""
    kinds: tuple[str, ...]
    include: bool = True


EMAIL_LANE = Lane(("email",))
OTHER_LANE = Lane(("email",), include=False)


class PermanentFailure(Exception):
    """The receiver refused the message for good (bad address, 4xx); retrying will not help."""


class Sender(Protocol):
    def send(self, message: Outgoing) -> None:
        """Deliver the message or raise. PermanentFailure parks it; anything else is retried."""


def enqueue(session: Session, keyring: Keyring, *, kind: str, key: str, payload: dict,
            now: datetime) -> None:
    """Add a message to the outbox inside the caller's transaction. A repeated key is ignored."""
    if session.scalar(select(OutboxMessage.id).where(OutboxMessage.idempotency_key == key)):
        return
    session.add(OutboxMessage(kind=kind, idempotency_key=key, payload_enc=keyring.encrypt_json(payload),
                              status="pending", attempts=0, next_attempt_at=now, created_at=now,
                              **belongs_to(payload)))


def belongs_to(payload: dict) -> dict:
    """The case and conversation a message is about, kept in the clear so retention can find them."""
    context = payload.get("context") or {}
    return {"case_id": payload.get("case_id") or context.get("case_id"),
            "conversation_key": payload.get("conversation")}


def backoff(attempts: int) -> float:
    delay = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** max(0, attempts - 1)))
    return delay * random.uniform(0.8, 1.2)


class Dispatcher:
    def __init__(self, db, *, keyring: Keyring, senders: dict[str, Sender], clock, metrics=None,
                 max_attempts: int = MAX_ATTEMPTS):
        self.db, self.keyring, self.senders, self.clock = db, keyring, senders, clock
        self.metrics, self.max_attempts = metrics, max_attempts
        self.owner = uuid.uuid4().hex

    def _lease(self, limit: int, lane: Lane | None) -> list[Outgoing]:
        now = self.clock.now()
        with self.db.transaction() as session:
            query = (select(OutboxMessage)
                     .where(OutboxMessage.status == "pending", OutboxMessage.next_attempt_at <= now,
                            (OutboxMessage.lease_until.is_(None)) | (OutboxMessage.lease_until < now))
                     .order_by(OutboxMessage.id).limit(limit))
            if lane is not None:
                query = query.where(OutboxMessage.kind.in_(lane.kinds) if lane.include
                                    else OutboxMessage.kind.not_in(lane.kinds))
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            leased = []
            for row in rows:
                row.lease_until, row.lease_owner = now + LEASE, self.owner
                row.attempts += 1
                leased.append(Outgoing(row.id, row.kind, row.idempotency_key,
                                       self.keyring.decrypt_json(row.payload_enc), row.attempts))
            return leased

    def run_once(self, limit: int = 50, lane: Lane | None = None) -> int:
        """Send what is due (in `lane` only, when given); returns how many messages were attempted."""
        batch = self._lease(limit, lane)
        for message in batch:
            if self._renew(message):
                self._deliver(message)
        return len(batch)

    def _renew(self, message: Outgoing) -> bool:
        """Extend the lease just before sending, so a slow batch cannot outlive it: by the time a late
        message's turn comes, another worker may have taken it over (False), and then it is theirs."""
        with self.db.transaction() as session:
            result = session.execute(update(OutboxMessage)
                                     .where(OutboxMessage.id == message.id, OutboxMessage.status == "pending",
                                            OutboxMessage.lease_owner == self.owner)
                                     .values(lease_until=self.clock.now() + LEASE))
        return result.rowcount == 1

    def _deliver(self, message: Outgoing) -> None:
        sender = self.senders.get(message.kind)
        error, permanent = None, False
        try:
            if sender is None:
                raise PermanentFailure(f"no sender configured for kind {message.kind!r}")
            sender.send(message)
        except PermanentFailure as exc:
            error, permanent = f"{type(exc).__name__}: {exc}", True
        except Exception as exc:  # noqa: BLE001 - any failure of a receiver is retried
            error = f"{type(exc).__name__}: {exc}"
        now = self.clock.now()
        with self.db.transaction() as session:
            values: dict
            if error is None:
                values = dict(status="sent", sent_at=now, lease_until=None, last_error=None)
            elif permanent or message.attempt >= self.max_attempts:
                values = dict(status="dead", lease_until=None, last_error=error[:2000])
            else:
                values = dict(next_attempt_at=now + timedelta(seconds=backoff(message.attempt)),
                              lease_until=None, last_error=error[:2000])
            session.execute(update(OutboxMessage)
                            .where(OutboxMessage.id == message.id, OutboxMessage.lease_owner == self.owner)
                            .values(**values))
        outcome = "sent" if error is None else values["status"] if "status" in values else "retry"
        if self.metrics:
            self.metrics.outbox(message.kind, outcome)
        if error:
            log.warning("outbox message %s (%s) attempt %s failed: %s", message.id, message.kind,
                        message.attempt, error)


def retry_dead(session: Session, message_id: int | None, now: datetime) -> int:
    """Put a dead message (or, with None, all of them) back in the queue; returns how many."""
    query = update(OutboxMessage).where(OutboxMessage.status == "dead")
    if message_id is not None:
        query = query.where(OutboxMessage.id == message_id)
    result = session.execute(query.values(status="pending", attempts=0, next_attempt_at=now,
                                          lease_until=None, lease_owner=None))
    return result.rowcount
