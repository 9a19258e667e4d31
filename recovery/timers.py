"""Timers are rows with a due time; the worker fires them. Cancelling a case cancels its timers."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from recovery.models import Timer

KINDS = ("code_expiry", "verifying_expiry", "approval_reminder", "approval_escalation",
         "approval_expiry", "notice_window", "link_expiry", "link_reminder")


def schedule(session: Session, case_id: str, kind: str, due_at: datetime) -> None:
    assert kind in KINDS, kind
    session.add(Timer(case_id=case_id, kind=kind, due_at=due_at))


def schedule_in(session: Session, case_id: str, kind: str, now: datetime, **delta) -> None:
    schedule(session, case_id, kind, now + timedelta(**delta))


def cancel(session: Session, case_id: str, now: datetime, kinds: tuple[str, ...] | None = None) -> None:
    query = update(Timer).where(Timer.case_id == case_id, Timer.fired_at.is_(None),
                                Timer.cancelled_at.is_(None))
    if kinds:
        query = query.where(Timer.kind.in_(kinds))
    session.execute(query.values(cancelled_at=now))


def due(now: datetime):
    """The query for the next due timer. Its conditions match the open-timers partial index (migration
    0009) word for word, so the planner reads only open timers, never the fired or cancelled history."""
    return (select(Timer).where(Timer.fired_at.is_(None), Timer.cancelled_at.is_(None), Timer.due_at <= now)
            .order_by(Timer.due_at, Timer.id).limit(1))


def claim_due(session: Session, now: datetime, *, postgres: bool) -> Timer | None:
    query = due(now)
    if postgres:
        query = query.with_for_update(skip_locked=True)
    return session.scalar(query)


def pending(session: Session, case_id: str) -> list[Timer]:
    return list(session.scalars(select(Timer).where(Timer.case_id == case_id, Timer.fired_at.is_(None),
                                                    Timer.cancelled_at.is_(None)).order_by(Timer.due_at)))


def postpone(session: Session, timer_id: int, now: datetime, **delta) -> None:
    session.execute(update(Timer).where(Timer.id == timer_id).values(due_at=now + timedelta(**delta)))
