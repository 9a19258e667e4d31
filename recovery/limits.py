"""Sliding-window attempt limits (per chat contact, per IP), kept in the database so that every web
and worker process sees the same counts."""
from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from recovery.models import Attempt


def allow(session: Session, key: str, *, now: datetime, limit: int, window: timedelta) -> bool:
    """Count one attempt under `key`; False (and nothing counted) when the limit is already reached."""
    since = now - window
    used = session.scalar(select(func.count(Attempt.id)).where(Attempt.key == key, Attempt.at > since))
    if used >= limit:
        return False
    session.add(Attempt(key=key, at=now))
    return True


def retry_after(session: Session, key: str, *, now: datetime, limit: int, window: timedelta) -> int:
    """Seconds until one more attempt under `key` would be allowed (at least 1)."""
    times = session.scalars(select(Attempt.at).where(Attempt.key == key, Attempt.at > now - window)
                            .order_by(Attempt.at.desc()).limit(limit)).all()
    if len(times) < limit:
        return 1
    return max(1, math.ceil((times[-1] + window - now).total_seconds()))


def prune(session: Session, *, now: datetime, older_than: timedelta = timedelta(days=1)) -> None:
    session.execute(delete(Attempt).where(Attempt.at < now - older_than))
