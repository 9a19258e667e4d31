"""Readiness: whether this process can do its job now. Liveness (/healthz) only says it is up."""
from __future__ import annotations

from recovery import heartbeats
from recovery.db import head_revision


def readiness(container) -> tuple[bool, dict[str, str]]:
    """(ready, check -> "ok" or what is wrong): the database answers, its schema is the one this code
    needs, and some worker has reported a heartbeat recently."""
    checks: dict[str, str] = {}
    try:
        revision = container.db.revision()
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
        return False, {"database": f"unreachable ({type(exc).__name__})"}
    checks["database"] = "ok"
    head = head_revision()
    if revision != head:
        checks["schema"] = f"at {revision or 'no revision'}, this code needs {head}: run `recoverybot db upgrade`"
        return False, checks
    checks["schema"] = "ok"
    now = container.clock.now()
    try:
        with container.db.reading() as session:
            last = heartbeats.latest(session)
    except Exception as exc:  # noqa: BLE001
        return False, checks | {"worker": f"cannot read heartbeats ({type(exc).__name__})"}
    if last is None:
        checks["worker"] = "no worker has reported yet: start `recoverybot worker`"
    elif now - last > heartbeats.STALE:
        checks["worker"] = f"no worker heartbeat for {int((now - last).total_seconds())} s"
    else:
        checks["worker"] = "ok"
    return all(v == "ok" for v in checks.values()), checks
