"""Statements per message: a web-chat turn and an approval decision stay within the round trips measured by
benchmarks/roundtrips.py (docs/performance.md, "Round trips per message"). Counted with SQLAlchemy's engine
events, on both databases; a change that adds a query to these paths fails here."""
from __future__ import annotations

import threading
import uuid

from sqlalchemy import event, func, select

from recovery import audit, inbox
from recovery.clock import ManualClock
from recovery.models import Approval, AuditRecord, ChatMessage, ChatSession
from tests.helpers import awaiting_case, get_case, load_demo

# upper bounds: (statements, commits) on each database, as measured when they were set
WEBCHAT_TURN = {"sqlite": (5, 1), "postgresql": (6, 1)}
DECISION = {"sqlite": (12, 1), "postgresql": (11, 1)}


class Counted:
    def __init__(self, engine):
        self.engine, self.statements, self.commits = engine, [], 0

    def _statement(self, conn, cursor, statement, parameters, context, executemany):
        if not statement.lstrip().upper().startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE is ours
            self.statements.append(" ".join(statement.split())[:120])

    def _commit(self, conn):
        self.commits += 1

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)


def _within(counted: Counted, bound: tuple[int, int]) -> None:
    listing = "\n".join(counted.statements)
    assert len(counted.statements) <= bound[0], f"{len(counted.statements)} statements:\n{listing}"
    assert counted.commits <= bound[1], f"{counted.commits} commits"


def test_web_chat_turn_takes_one_transaction_of_few_statements(make_container, any_db_url):
    """A web-chat message's turn in the worker (claim, dialog, reply in the transcript, done) is one
    transaction of at most 5 statements on SQLite and 6 on PostgreSQL."""
    clock = ManualClock()
    c = make_container(any_db_url, clock=clock)
    sid = "s" + uuid.uuid4().hex[:12]
    with c.db.transaction() as s:
        s.add(ChatSession(id=sid, locale="en", created_at=c.clock.now()))

    def turn(n: int) -> Counted:
        assert inbox.store(c.db, source="webchat", delivery_key=f"webchat:{sid}:{n}",
                           conversation_key=f"webchat:{sid}", now=c.clock.now(),
                           payload={"session_id": sid, "text_enc": c.keyring.encrypt("what is 2fa?"),
                                    "ip": "127.0.0.1", "locale": "en"})
        with Counted(c.db.engine) as counted:
            assert inbox.process_one(c.db, c.worker.handler, c.clock.now)
        _within(counted, WEBCHAT_TURN[c.db.engine.dialect.name])
        return counted

    turn(1)
    with c.db.transaction() as s:  # the reply is in the transcript, written by that same transaction
        replies = s.scalars(select(ChatMessage).where(ChatMessage.session_id == sid, ChatMessage.sender == "bot")).all()
    assert len(replies) == 1 and "2FA" in replies[0].text.upper()

    # The next message of the same conversation, a minute later: within the same bound, and the
    # conversation row is updated once.
    clock.advance(minutes=1)
    counted = turn(2)
    assert sum(st.startswith("UPDATE conversations") for st in counted.statements) == 1, counted.statements


def test_decision_takes_one_transaction_of_few_statements(make_container, any_db_url):
    """An approval that completes a low-risk case (lock, checks, approval, guarded transition, timers, emails,
    staff message, audit chain) is one transaction of at most 14 statements on SQLite and 12 on PostgreSQL,
    and still writes its approval, its state change and both audit records, chained."""
    c = make_container(any_db_url)
    load_demo(c)
    case_id = awaiting_case(c, "alex@example.com")
    with Counted(c.db.engine) as counted:
        c.recovery.decide(case_id, approver="alice", decision="approve")
    _within(counted, DECISION[c.db.engine.dialect.name])
    assert get_case(c, case_id).state == "approved"
    with c.db.transaction() as s:
        assert len(s.scalars(select(Approval).where(Approval.case_id == case_id)).all()) == 1
        events = [r.event for r in s.scalars(select(AuditRecord).where(AuditRecord.case_id == case_id)
                                             .order_by(AuditRecord.id))]
        assert events[-2:] == ["approval", "approve"]
        assert audit.verify(s).ok


def test_concurrent_appends_keep_one_unbroken_chain(make_container, any_db_url):
    """Forty transactions append audit records at the same moment, the very first append among them
    (no head yet), some with two records and a non-ASCII reason: every record is written once, and the
    chain verifies (the hashes the database computes match the ones `verify` recomputes)."""
    c = make_container(any_db_url)
    barrier = threading.Barrier(40)
    errors = []

    def append(i: int) -> None:
        try:
            barrier.wait()
            with c.db.transaction() as s:
                for k in range(1 + i % 2):
                    audit.append(s, case_id=f"RC-C{i:02d}", event="approval", from_state="awaiting_approval",
                                 to_state="awaiting_approval", actor=f"slack:T1:U{i}", channel="slack",
                                 reason=f"raison n°{k} — 审批", at=c.clock.now())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with c.db.transaction() as s:
        assert s.scalar(select(func.count(AuditRecord.id))) == 60
        result = audit.verify(s)
        assert result.ok and result.checked == 60, result


def test_the_id_sequence_keeps_up_so_an_earlier_release_can_still_append(make_container, pg_url):
    """Ids come from the chain's head, but the table's sequence is moved along with it: code of the
    previous release (which inserts without an id, taking the sequence's next value) running beside this
    one in a rolling deploy, or after a rollback, gets a fresh id instead of a duplicate-key error."""
    from sqlalchemy import text

    c = make_container(pg_url)
    for i in range(3):  # the first goes the Python way (no head yet), the others in one statement
        with c.db.transaction() as s:
            audit.append(s, case_id=f"RC-S{i}", event="opened", from_state=None, to_state="opened",
                         actor="customer", channel="webchat", reason=None, at=c.clock.now())
    with c.db.transaction() as s:
        newest = s.scalar(select(func.max(AuditRecord.id)))
        taken = s.scalar(text("""INSERT INTO audit_log (case_id, event, actor, channel, at, prev_hash, hash)
                                 VALUES ('RC-OLD', 'opened', 'customer', 'webchat', now(), '', '')
                                 RETURNING id"""))
    assert taken > newest
