"""The case state machine and its hash-chained audit log."""
from __future__ import annotations

import pytest
from sqlalchemy import delete, select, update

from recovery import audit, machine
from recovery.errors import IllegalTransition
from recovery.machine import FINAL, OPEN, TRANSITIONS, State
from recovery.models import AuditRecord, Case


def _case(session, now, state="opened") -> Case:
    case = Case(id=f"RC-T{state[:6].upper()}", state=state, channel="test", conversation_id="t:1",
                opened_by="customer", locale="en", risk_reasons=[], created_at=now, updated_at=now)
    session.add(case)
    session.flush()
    return case


def test_table_matches_the_spec():
    """The declared transitions are exactly the table in docs/states.md: every open state leads on, finals lead nowhere."""
    leaves = {s: set() for s in State}
    for t in TRANSITIONS:
        for source in t.sources:
            leaves[source].add(t.target)
    S = State
    assert leaves[S.OPENED] == {S.VERIFYING, S.CANCELLED}
    assert leaves[S.VERIFYING] == {S.AWAITING_APPROVAL, S.REJECTED, S.LOCKED, S.CANCELLED, S.EXPIRED}
    assert leaves[S.AWAITING_APPROVAL] == {S.APPROVED, S.DENIED, S.CANCELLED, S.EXPIRED}
    assert leaves[S.APPROVED] == {S.LINK_SENT, S.CANCELLED}
    assert leaves[S.LINK_SENT] == {S.COMPLETED, S.EXPIRED, S.CANCELLED}
    assert all(not leaves[s] for s in FINAL)
    assert OPEN | FINAL == set(State)


def test_illegal_event_raises_and_changes_nothing(make_container, sqlite_url):
    """Approving a case that is still verifying raises IllegalTransition naming event and state, and writes nothing."""
    c = make_container(sqlite_url)
    now = c.clock.now()
    with c.db.transaction() as s:
        case = _case(s, now, "verifying")
    with pytest.raises(IllegalTransition) as info:
        with c.db.transaction() as s:
            machine.fire(s, s.get(Case, case.id), "approve", actor="x", channel="test", now=now)
    assert "approve" in str(info.value) and "verifying" in str(info.value)
    with c.db.transaction() as s:
        assert s.get(Case, case.id).state == "verifying"
        assert s.scalar(select(AuditRecord.id)) is None


@pytest.mark.parametrize("final", sorted(FINAL))
def test_no_event_leaves_a_final_state(make_container, sqlite_url, final):
    """Every event is refused in every final state."""
    c = make_container(sqlite_url)
    now = c.clock.now()
    with c.db.transaction() as s:
        case = _case(s, now, final.value)
        for t in TRANSITIONS:
            with pytest.raises(IllegalTransition):
                machine.fire(s, case, t.event, actor="x", channel="test", now=now)


def test_stale_copy_loses_the_race(make_container, sqlite_url):
    """A caller holding an outdated copy of the case cannot transition it (compare-and-set on state and version)."""
    c = make_container(sqlite_url)
    now = c.clock.now()
    with c.db.transaction() as s:
        case = _case(s, now, "awaiting_approval")
    with c.db.transaction() as s:
        stale = s.get(Case, case.id)
        s.expunge(stale)
    with c.db.transaction() as s:
        machine.fire(s, s.get(Case, case.id), "deny", actor="a", channel="test", now=now, reason="no")
    with pytest.raises(IllegalTransition):
        with c.db.transaction() as s:
            stale_in_session = s.merge(stale, load=False)
            machine.fire(s, stale_in_session, "approve", actor="b", channel="test", now=now)
    with c.db.transaction() as s:
        assert s.get(Case, case.id).state == "denied"
        assert [r.event for r in audit.trail(s, case.id)] == ["deny"]


def _three_transitions(c):
    now = c.clock.now()
    with c.db.transaction() as s:
        case = _case(s, now)
        for event in ("start_checks", "request_approval", "approve"):
            machine.fire(s, case, event, actor="system", channel="test", now=now)
    return case


def test_audit_chain_verifies_and_finds_an_edit(make_container, any_db_url):
    """The chain verifies when untouched, and an edited record is reported by id."""
    c = make_container(any_db_url)
    _three_transitions(c)
    with c.db.transaction() as s:
        result = audit.verify(s)
        assert result.ok and result.checked == 3
        second = s.scalars(select(AuditRecord).order_by(AuditRecord.id)).all()[1]
        s.execute(update(AuditRecord).where(AuditRecord.id == second.id).values(actor="mallory"))
    with c.db.transaction() as s:
        result = audit.verify(s)
    assert not result.ok and result.broken_id == second.id and "edited" in result.problem


def test_audit_chain_finds_deleted_records(make_container, any_db_url):
    """Deleting a middle record or the newest one breaks the chain."""
    c = make_container(any_db_url)
    _three_transitions(c)
    with c.db.transaction() as s:
        ids = s.scalars(select(AuditRecord.id).order_by(AuditRecord.id)).all()
        s.execute(delete(AuditRecord).where(AuditRecord.id == ids[-1]))
    with c.db.transaction() as s:
        result = audit.verify(s)
        assert not result.ok and "newest records were deleted" in result.problem
        s.execute(delete(AuditRecord).where(AuditRecord.id == ids[0]))
    with c.db.transaction() as s:
        result = audit.verify(s)
    assert not result.ok and result.broken_id == ids[1]


def test_state_diagram_is_generated_from_the_table():
    """docs/states.md shows the diagram generated from TRANSITIONS, so it cannot go stale."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "states.md").read_text()
    assert machine.mermaid() in doc
