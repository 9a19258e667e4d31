"""Worker heartbeats: each worker process touches its row as its loop goes round.

The row is written by the loop itself, not by a side thread, so a fresh heartbeat means "a worker is
making progress", which is what readiness and the stalled-worker alert need to know.
"""
from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from recovery.models import WorkerHeartbeat

# A worker beats at most this often; it is considered gone when no worker beat for STALE.
INTERVAL = timedelta(seconds=10)
STALE = timedelta(seconds=120)
FORGET = timedelta(days=1)  # rows of workers that stopped are removed after this


def new_worker_id() -> str:
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def beat(session: Session, worker_id: str, *, now: datetime, started_at: datetime) -> None:
    if session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.id == worker_id)
                       .values(beat_at=now)).rowcount == 0:
        host, pid, _ = worker_id.rsplit(":", 2)
        session.add(WorkerHeartbeat(id=worker_id, host=host, pid=int(pid), started_at=started_at, beat_at=now))
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.beat_at < now - FORGET))


def latest(session: Session) -> datetime | None:
    """When the freshest heartbeat of any worker was written, or None when no worker ever beat."""
    return session.scalar(select(func.max(WorkerHeartbeat.beat_at)))


def alive(session: Session, now: datetime) -> int:
    """How many workers beat within STALE."""
    return session.scalar(select(func.count(WorkerHeartbeat.id))
                          .where(WorkerHeartbeat.beat_at >= now - STALE)) or 0
