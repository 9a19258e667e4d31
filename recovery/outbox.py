"""The outbox: side effects written in the same transaction as the state change, sent afterwards.

The dispatcher leases ready rows (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so any number of workers can
run), sends them outside any transaction, then records the outcome. Delivery is at least once, and each
message carries its idempotency key so receivers that can dedupe do.

Leases are short (LEASE) and kept alive while their batch is in progress, so a worker killed mid-pass
holds its messages for seconds, not minutes. A pass that fails (the database went away mid-pass) gives
back what it had not finished; when the database is down even for that, the next pass that can reach it
does so first. Each batch leases under a token of its own, so giving a stale batch back can never touch
rows that a later batch of the same worker has leased since.
"""
from __future__ import annotations

import logging
import random
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import literal_column, select, update
from sqlalchemy.orm import Session

from recovery.crypto import Keyring
from recovery.db import insert_new
from recovery.models import OutboxMessage

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=10)
# How long a pass keeps messages it has not started on: past this, a slow pass (a relay taking its time
# over each email) lets the rest of its batch go, so idle workers send them instead of waiting behind it.
HOLD_UNTRIED = timedelta(seconds=30)
# Written into the SQL, not bound: only then can a prepared (generic) plan on PostgreSQL, and SQLite's
# planner, match the partial index `ix_outbox_pending_id ... WHERE status = 'pending'`.
PENDING = literal_column("'pending'")
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
# What an approver waits for in a modal that says "Recording…": sent right after the decisions, ahead of
# the timers and card updates those decisions caused.
APPROVER_LANE = Lane(("slack",))


class PermanentFailure(Exception):
    """The receiver refused the message for good (bad address, 4xx); retrying will not help."""


class Sender(Protocol):
    def send(self, message: Outgoing) -> None:
        """Deliver the message or raise. PermanentFailure parks it; anything else is retried."""


def enqueue(session: Session, keyring: Keyring, *, kind: str, key: str, payload: dict,
            now: datetime) -> None:
    """Add a message to the outbox inside the caller's transaction. A repeated key is ignored.

    One INSERT ... ON CONFLICT DO NOTHING, with the row passed as parameters (the wake-up hook reads its
    kind there): no look-up first, and two transactions racing with one key insert it once."""
    session.execute(insert_new(session, OutboxMessage, OutboxMessage.idempotency_key),
                    dict(kind=kind, idempotency_key=key, payload_enc=keyring.encrypt_json(payload),
                         status="pending", attempts=0, next_attempt_at=now, created_at=now, **belongs_to(payload)))


def belongs_to(payload: dict) -> dict:
    """The case and conversation a message is about, kept in the clear so retention can find them."""
    context = payload.get("context") or {}
    return {"case_id": payload.get("case_id") or context.get("case_id"),
            "conversation_key": payload.get("conversation")}


def backoff(attempts: int) -> float:
    delay = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** max(0, attempts - 1)))
    return delay * random.uniform(0.8, 1.2)


class Batch:
    """The messages one pass leased, under the token that pass leased them with.

    `open` holds what is still ours and not finished; `tried` what has been handed to a sender (given
    back, those keep their attempt; the others get it back). `held_until` is when the last renewal
    runs out: until well before then no other worker can have taken
    a message, so a send needs no round trip to check. It is read on the clock that wrote `lease_until`,
    which is the clock other workers compare it with.
    """

    def __init__(self, token: str, messages: list[Outgoing], leased_at: datetime, lease: timedelta):
        self.token, self.messages = token, messages
        self.open = {m.id for m in messages}
        self.tried: set[int] = set()
        self.leased_at, self.held_until = leased_at, leased_at + lease
        self.lock = threading.Lock()  # the renewer thread and the sending thread both renew


class Dispatcher:
    def __init__(self, db, *, keyring: Keyring, senders: dict[str, Sender], clock, metrics=None,
                 max_attempts: int = MAX_ATTEMPTS, lease: timedelta = LEASE, hold_untried: timedelta = HOLD_UNTRIED):
        self.db, self.keyring, self.senders, self.clock = db, keyring, senders, clock
        self.metrics, self.max_attempts, self.lease = metrics, max_attempts, lease
        self.hold_untried = hold_untried
        self._stranded: list[tuple[str, set[int], set[int]]] = []  # batches a failed pass could not give back
        self._stranded_lock = threading.Lock()

    def _lease(self, limit: int, lane: Lane | None) -> Batch:
        token = uuid.uuid4().hex
        now = self.clock.now()
        with self.db.transaction() as session:
            query = (select(OutboxMessage)
                     .where(OutboxMessage.status == PENDING, OutboxMessage.next_attempt_at <= now,
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
                row.lease_until, row.lease_owner = now + self.lease, token
                row.attempts += 1
                leased.append(Outgoing(row.id, row.kind, row.idempotency_key,
                                       self.keyring.decrypt_json(row.payload_enc), row.attempts))
        return Batch(token, leased, now, self.lease)

    def run_once(self, limit: int = 50, lane: Lane | None = None) -> int:
        """Send what is due (in `lane` only, when given); returns how many messages were attempted.

        Raises when the database fails; what this pass leased is given back first (or, with the
        database down, by the next pass), so it is sent again within seconds."""
        self.release_stranded()
        batch = self._lease(limit, lane)
        if not batch.messages:
            return 0
        stop = threading.Event()
        renewer = threading.Thread(target=self._keep_renewing, args=(batch, stop), daemon=True,
                                   name="outbox-lease")
        renewer.start()
        try:
            for message in batch.messages:
                if self._still_ours(batch, message.id):
                    with batch.lock:  # the renewer may have let it go meanwhile (HOLD_UNTRIED)
                        if message.id not in batch.open:
                            continue
                        batch.tried.add(message.id)
                    self._deliver(message, batch)
        except BaseException:
            # The renewer stops first: a renewal landing after the give-back would lease them again.
            stop.set()
            renewer.join()
            self._give_back(batch.token, set(batch.open), set(batch.tried))
            raise
        finally:
            stop.set()
            renewer.join()
        return len(batch.messages)

    def _still_ours(self, batch: Batch, message_id: int) -> bool:
        """Whether the message is still leased to this batch. While the last renewal has more than half
        its time to run, nobody else can have taken it; past that, renew now (a slow send before it, or
        a renewer that could not reach the database) and see which messages are left."""
        if self.clock.now() < batch.held_until - self.lease / 2:
            return message_id in batch.open
        self._renew(batch)
        return message_id in batch.open

    def _renew(self, batch: Batch) -> None:
        with batch.lock:
            if not batch.open:
                return
            now = self.clock.now()
            with self.db.transaction() as session:
                kept = session.scalars(
                    update(OutboxMessage)
                    .where(OutboxMessage.id.in_(batch.open), OutboxMessage.status == "pending",
                           OutboxMessage.lease_owner == batch.token)
                    .values(lease_until=now + self.lease)
                    .returning(OutboxMessage.id)).all()
            lost = batch.open - set(kept)
            if lost:  # the lease ran out and another worker took these over: they are theirs now
                log.warning("outbox lease lost for %s message(s); another worker sends them", len(lost))
            batch.open = set(kept)
            batch.held_until = now + self.lease

    def _keep_renewing(self, batch: Batch, stop: threading.Event) -> None:
        """For sends slower than the lease (an SMTP server taking its time): renew the whole batch now
        and then while the pass is still going."""
        # Renewed well before it runs out: a renewal delayed by a busy database still lands in time.
        while not stop.wait(self.lease.total_seconds() / 3):
            try:
                self._renew(batch)
                if self.clock.now() - batch.leased_at >= self.hold_untried:
                    self._let_go_of_untried(batch)
            except Exception as exc:  # noqa: BLE001 - the sending thread renews itself if this stays down
                log.warning("could not renew outbox leases: %s: %s", type(exc).__name__, exc)

    def _let_go_of_untried(self, batch: Batch) -> None:
        with batch.lock:  # taken before a send starts, so a message is either sent here or let go
            untried = batch.open - batch.tried
            if untried:
                self._release(batch.token, untried, set())
                batch.open -= untried

    def _give_back(self, token: str, open_ids: set[int], tried: set[int]) -> None:
        if not open_ids:
            return
        try:
            self._release(token, open_ids, tried)
        except Exception as exc:  # noqa: BLE001 - the database is down: the next pass that reaches it does it
            log.warning("could not give back %s outbox lease(s) yet: %s", len(open_ids), type(exc).__name__)
            with self._stranded_lock:
                self._stranded.append((token, open_ids, tried))

    def release_stranded(self) -> None:
        """Give back what failed passes could not (the database was down then); raises while it still is."""
        with self._stranded_lock:
            stranded, self._stranded = self._stranded, []
        for i, (token, open_ids, tried) in enumerate(stranded):
            try:
                self._release(token, open_ids, tried)
            except BaseException:
                with self._stranded_lock:
                    self._stranded.extend(stranded[i:])
                raise

    def _release(self, token: str, open_ids: set[int], tried: set[int]) -> None:
        """Clear the lease of rows this batch still holds, so the next pass sends them at once. A message
        never handed to its sender gets its attempt back: a database blip must not use up its retries."""
        mine = (OutboxMessage.lease_owner == token, OutboxMessage.status == "pending")
        with self.db.transaction() as session:
            untried = open_ids - tried
            if untried:
                session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(untried), *mine)
                                .values(lease_until=None, lease_owner=None, attempts=OutboxMessage.attempts - 1))
            if open_ids & tried:
                session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(open_ids & tried), *mine)
                                .values(lease_until=None, lease_owner=None))
        log.info("gave back %s outbox lease(s)", len(open_ids))

    def _deliver(self, message: Outgoing, batch: Batch) -> None:
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
        released = dict(lease_until=None, lease_owner=None)  # no renewal can match it again
        if error is None:
            values = dict(status="sent", sent_at=now, last_error=None, **released)
        elif permanent or message.attempt >= self.max_attempts:
            values = dict(status="dead", last_error=error[:2000], **released)
        else:
            values = dict(next_attempt_at=now + timedelta(seconds=backoff(message.attempt)),
                          last_error=error[:2000], **released)
        # Under the batch's lock, so the renewer sees the message either still open or done, never
        # retried-and-renewed; if this fails, it stays open and the failed pass gives it back.
        with batch.lock:
            with self.db.transaction() as session:
                session.execute(update(OutboxMessage)
                                .where(OutboxMessage.id == message.id, OutboxMessage.lease_owner == batch.token)
                                .values(**values))
            batch.open.discard(message.id)
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
