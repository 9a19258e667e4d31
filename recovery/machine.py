"""The recovery case's states and transitions, declared once (docs/states.md shows them as a diagram).

`fire()` is the only code that changes `Case.state`. It refuses an event that the table does not allow
from the current state, moves the state with a compare-and-set UPDATE (so two racing callers produce
exactly one transition; RETURNING reads the row back in the same statement), and appends a hash-chained
audit record in the same transaction.
Guards that depend on policy (enough approvals, a passed code check) are checked by the service
before it fires the event; the table is about which moves exist at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import update
from sqlalchemy.orm import Session

from recovery import audit
from recovery.errors import ConcurrentChange, IllegalTransition
from recovery.models import Case


class State(StrEnum):
    OPENED = "opened"
    VERIFYING = "verifying"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    LINK_SENT = "link_sent"
    COMPLETED = "completed"
    DENIED = "denied"
    REJECTED = "rejected"
    LOCKED = "locked"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


S = State
FINAL = frozenset({S.COMPLETED, S.DENIED, S.REJECTED, S.LOCKED, S.CANCELLED, S.EXPIRED})
OPEN = frozenset(State) - FINAL


@dataclass(frozen=True)
class Transition:
    event: str
    sources: frozenset[State]
    target: State


def _t(event: str, sources, target: State) -> Transition:
    return Transition(event, frozenset(sources), target)


TRANSITIONS: tuple[Transition, ...] = (
    _t("start_checks",     {S.OPENED},                                 S.VERIFYING),
    _t("request_approval", {S.VERIFYING},                              S.AWAITING_APPROVAL),
    _t("reject",           {S.VERIFYING},                              S.REJECTED),
    _t("lock",             {S.VERIFYING},                              S.LOCKED),
    _t("approve",          {S.AWAITING_APPROVAL},                      S.APPROVED),
    _t("deny",             {S.AWAITING_APPROVAL},                      S.DENIED),
    _t("send_link",        {S.APPROVED},                               S.LINK_SENT),
    _t("complete",         {S.LINK_SENT},                              S.COMPLETED),
    _t("cancel",           {S.OPENED, S.VERIFYING, S.AWAITING_APPROVAL, S.APPROVED, S.LINK_SENT},
                                                                       S.CANCELLED),
    _t("expire",           {S.VERIFYING, S.AWAITING_APPROVAL, S.LINK_SENT}, S.EXPIRED),
)
_BY_EVENT = {t.event: t for t in TRANSITIONS}


def allowed(event: str, state: str) -> bool:
    t = _BY_EVENT.get(event)
    return t is not None and State(state) in t.sources


def fire(session: Session, case: Case, event: str, *, actor: str, channel: str, now,
         reason: str | None = None, note: str | None = None) -> State:
    """Apply `event` to `case`; raise IllegalTransition (or ConcurrentChange) and change nothing.

    `reason` is a fixed phrase of ours; `note` is text a person typed (an approver's reason). A final
    state keeps either as the case's reason, but the audit record only gets the note's digest, since the
    note may name people and is purged with the case's details.
    """
    transition = _BY_EVENT.get(event)
    if transition is None or State(case.state) not in transition.sources:
        raise IllegalTransition(case.id, event, case.state)
    source = case.state
    final = transition.target in FINAL
    # One round trip: the guard is in the WHERE, and RETURNING refreshes `case` in the same statement.
    moved = session.execute(
        update(Case)
        .where(Case.id == case.id, Case.state == source, Case.version == case.version)
        .values(state=transition.target.value, version=Case.version + 1, updated_at=now,
                final_reason=(note or reason) if final else Case.final_reason,
                closed_at=now if final else Case.closed_at)
        .returning(Case)
        .execution_options(populate_existing=True, synchronize_session=False)
    ).scalar_one_or_none()
    if moved is None:
        session.refresh(case)
        raise ConcurrentChange(case.id, event, case.state)
    audit.append(session, case_id=case.id, event=event, from_state=source,
                 to_state=transition.target.value, actor=actor, channel=channel, reason=reason, note=note,
                 at=now)
    return transition.target


def mermaid() -> str:
    """The state diagram, generated from TRANSITIONS, as used in docs/states.md."""
    lines = ["stateDiagram-v2", "    [*] --> opened"]
    for t in TRANSITIONS:
        for source in sorted(t.sources):
            lines.append(f"    {source.value} --> {t.target.value}: {t.event}")
    for state in sorted(FINAL):
        lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines)
