"""Numbers about the operation, read from the database, so every process reports the same ones.

The audit log is append-only and records every transition, approval and refused approval, so running
totals and durations are tallied from it incrementally: each update reads only the rows added since the
last one. The queues are a handful of counts over indexed columns. Both feed the Prometheus collector
(bot/metrics.py) and `recoverybot report`.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from recovery import heartbeats
from recovery.inbox import MAX_ATTEMPTS as INBOX_MAX_ATTEMPTS
from recovery.machine import FINAL, OPEN, State
from recovery.models import AuditRecord, Case, InboxEvent, OutboxMessage

OPEN_STATES = tuple(sorted(s.value for s in OPEN))
FINAL_STATES = tuple(sorted(s.value for s in FINAL))
# Audit events that are not moves between states, and whose reason is a fixed vocabulary.
OPEN_EVENT, APPROVAL_EVENT, REFUSED_EVENT = "open", "approval", "approval_refused"
DECISION_START = "request_approval"  # the case enters awaiting_approval: approvers are asked
DECISION_EVENTS = ("approve", "deny")
COMPLETE_EVENT = "complete"

# Histogram buckets (seconds) for the two durations operators watch.
DECISION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 259200)
COMPLETION_BUCKETS = (300, 900, 3600, 14400, 43200, 86400, 172800, 259200, 345600, 604800, 864000)


# ---- queues: what is waiting right now --------------------------------------------------------------

@dataclass(frozen=True)
class Queues:
    cases: dict[str, int]                 # every open state, with 0 where none
    oldest_awaiting_approval: datetime | None
    inbox_backlog: int                    # events still to process
    inbox_oldest: datetime | None
    inbox_failed: int                     # events given up after MAX_ATTEMPTS, never processed
    outbox_ready: dict[str, int]          # kind -> messages due now
    outbox_oldest_ready: datetime | None  # the earliest due time among them
    outbox_dead: dict[str, int]           # kind -> messages parked after failing for good
    last_heartbeat: datetime | None
    workers_alive: int


def queues(session: Session, now: datetime) -> Queues:
    cases = dict.fromkeys(OPEN_STATES, 0) | dict(session.execute(
        select(Case.state, func.count()).where(Case.state.in_(OPEN_STATES)).group_by(Case.state)).all())
    oldest_awaiting = session.scalar(select(func.min(Case.updated_at))
                                     .where(Case.state == State.AWAITING_APPROVAL.value))
    pending = InboxEvent.processed_at.is_(None)
    backlog, inbox_oldest = session.execute(
        select(func.count(), func.min(InboxEvent.received_at))
        .where(pending, InboxEvent.attempts < INBOX_MAX_ATTEMPTS)).one()
    failed = session.scalar(select(func.count()).where(pending, InboxEvent.attempts >= INBOX_MAX_ATTEMPTS))
    ready_rows = session.execute(
        select(OutboxMessage.kind, func.count(), func.min(OutboxMessage.next_attempt_at))
        .where(OutboxMessage.status == "pending", OutboxMessage.next_attempt_at <= now)
        .group_by(OutboxMessage.kind)).all()
    dead = dict(session.execute(select(OutboxMessage.kind, func.count())
                                .where(OutboxMessage.status == "dead").group_by(OutboxMessage.kind)).all())
    return Queues(cases=cases, oldest_awaiting_approval=oldest_awaiting, inbox_backlog=backlog,
                  inbox_oldest=inbox_oldest, inbox_failed=failed,
                  outbox_ready={kind: n for kind, n, _ in ready_rows},
                  outbox_oldest_ready=min((due for _, _, due in ready_rows), default=None),
                  outbox_dead=dead, last_heartbeat=heartbeats.latest(session),
                  workers_alive=heartbeats.alive(session, now))


# ---- running totals over the audit log ---------------------------------------------------------------

@dataclass
class Durations:
    """Counts per bucket (not cumulative), with their sum: enough for a Prometheus histogram."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class AuditTally:
    """Totals since the beginning of the audit log; `update()` reads only rows added since the last.

    Audit ids are taken under the chain lock at commit, so ids become visible in order and the
    highest id seen is a safe place to resume from.
    """
    last_id: int = 0
    transitions: Counter = field(default_factory=Counter)   # (event, from_state, to_state)
    opens: Counter = field(default_factory=Counter)         # decoy reason, "none" for a real case
    decisions: Counter = field(default_factory=Counter)     # each approver's approve or deny
    refusals: Counter = field(default_factory=Counter)      # refused approvals by reason
    to_decision: dict = field(default_factory=lambda: defaultdict(lambda: Durations(DECISION_BUCKETS)))
    to_completion: Durations = field(default_factory=lambda: Durations(COMPLETION_BUCKETS))

    def update(self, session: Session) -> int:
        """Fold in the rows added since the last update; returns how many were read."""
        top = session.scalar(select(func.max(AuditRecord.id))) or 0
        if top <= self.last_id:
            return 0
        window = and_(AuditRecord.id > self.last_id, AuditRecord.id <= top)
        rows = session.execute(select(AuditRecord.event, AuditRecord.from_state, AuditRecord.to_state,
                                      func.count()).where(window)
                               .group_by(AuditRecord.event, AuditRecord.from_state, AuditRecord.to_state)).all()
        read = 0
        for event, source, target, n in rows:
            read += n
            if event == APPROVAL_EVENT:
                self.decisions["approve"] += n
            elif event == "deny":
                self.decisions["deny"] += n
            if event not in (OPEN_EVENT, APPROVAL_EVENT, REFUSED_EVENT):
                self.transitions[(event, source or "", target or "")] += n
        for event, reason, n in session.execute(
                select(AuditRecord.event, AuditRecord.reason, func.count())
                .where(window, AuditRecord.event.in_((OPEN_EVENT, REFUSED_EVENT)))
                .group_by(AuditRecord.event, AuditRecord.reason)).all():
            if event == OPEN_EVENT:
                self.opens[reason or "none"] += n
            else:
                self.refusals[reason or "unknown"] += n
        for event, started, ended in _spans(session, window, (DECISION_START,), DECISION_EVENTS):
            self.to_decision[event].observe(max(0.0, (ended - started).total_seconds()))
        for _, started, ended in _spans(session, window, (OPEN_EVENT,), (COMPLETE_EVENT,)):
            self.to_completion.observe(max(0.0, (ended - started).total_seconds()))
        self.last_id = top
        return read


def _spans(session: Session, window, start_events, end_events):
    """(end event, start time, end time) for each end event inside the window, paired with the same
    case's start event (which may be older than the window)."""
    start = aliased(AuditRecord)
    return session.execute(
        select(AuditRecord.event, start.at, AuditRecord.at)
        .join(start, and_(start.case_id == AuditRecord.case_id, start.event.in_(start_events)))
        .where(window, AuditRecord.event.in_(end_events))).all()


# ---- the report: cases opened in a period --------------------------------------------------------------

FUNNEL = (("opened", OPEN_EVENT), ("verified", DECISION_START), ("approved", "approve"),
          ("link sent", "send_link"), ("completed", COMPLETE_EVENT))


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    funnel: list[tuple[str, int]]              # stage, cases of the period that reached it
    decoys: int                                # opened for an unknown email or over a limit
    ended: Counter                             # (final state, state it left) -> cases
    still_open: Counter                        # state -> cases of the period still open
    to_decision: list[float]                   # seconds, one per decided case
    to_completion: list[float]                 # seconds, one per completed case
    per_day: list[tuple[str, int, int]]        # date, opened, completed


def report(session: Session, *, since: datetime, until: datetime) -> Report:
    """Cases opened in [since, until): how far they got, where the others stopped, and how long the
    decision and the whole recovery took."""
    opened = select(AuditRecord.case_id).where(AuditRecord.event == OPEN_EVENT, AuditRecord.at >= since,
                                               AuditRecord.at < until)
    events: dict[str, dict[str, tuple]] = defaultdict(dict)
    for case_id, event, source, target, reason, at in session.execute(
            select(AuditRecord.case_id, AuditRecord.event, AuditRecord.from_state, AuditRecord.to_state,
                   AuditRecord.reason, AuditRecord.at)
            .where(AuditRecord.case_id.in_(opened)).order_by(AuditRecord.id)).all():
        events[case_id].setdefault(event, (source, target, reason, at))
        events[case_id]["_last"] = (source, target, reason, at)
    funnel = [(stage, sum(1 for e in events.values() if event in e)) for stage, event in FUNNEL]
    decoys = sum(1 for e in events.values() if e[OPEN_EVENT][2])
    ended, still_open = Counter(), Counter()
    for e in events.values():
        source, target, _, _ = e["_last"]
        if target in FINAL_STATES:
            ended[(target, source)] += 1
        else:
            still_open[target] += 1
    to_decision = sorted((e[d][3] - e[DECISION_START][3]).total_seconds()
                         for e in events.values() for d in DECISION_EVENTS if d in e and DECISION_START in e)
    to_completion = sorted((e[COMPLETE_EVENT][3] - e[OPEN_EVENT][3]).total_seconds()
                           for e in events.values() if COMPLETE_EVENT in e)
    days = Counter(), Counter()
    for e in events.values():
        days[0][e[OPEN_EVENT][3].date().isoformat()] += 1
        if COMPLETE_EVENT in e:
            days[1][e[COMPLETE_EVENT][3].date().isoformat()] += 1
    first = since.date()
    per_day = []
    while first < until.date() or (first == until.date() and until.time() != datetime.min.time()):
        key = first.isoformat()
        per_day.append((key, days[0][key], days[1][key]))
        first += timedelta(days=1)
    return Report(since=since, until=until, funnel=funnel, decoys=decoys, ended=ended, still_open=still_open,
                  to_decision=to_decision, to_completion=to_completion, per_day=per_day)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats drifting
    return sorted_values[int(rank) - 1]
