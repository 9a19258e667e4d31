"""The hash-chained audit log.

Each record's hash covers its fields and the previous record's hash; `audit_head` keeps the newest
id and hash, so editing, deleting or truncating records is found by `verify()`.

Records are kept for good, so they hold no personal data: ids, states, actors (the customer, the owner,
the system, an approver's id) and fixed reason codes. Text a person typed, such as an approver's reason
for a denial, is kept with the case (and purged with its details); the record holds only its SHA-256,
so the note can still be shown to match the record while it is kept.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session

from recovery.models import AuditHead, AuditRecord

GENESIS = "0" * 64
NO_CASE = "-"  # the case id of records about the system itself (a purge run, a key rotation)


def _digest(prev_hash: str, fields: dict) -> str:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _fields(rec: AuditRecord) -> dict:
    return {"id": rec.id, "case_id": rec.case_id, "event": rec.event, "from": rec.from_state,
            "to": rec.to_state, "actor": rec.actor, "channel": rec.channel, "reason": rec.reason,
            "at": rec.at.isoformat(timespec="microseconds")}


def note_digest(note: str) -> str:
    """What a record keeps of a typed note: `note sha256:<hex>`."""
    return "note sha256:" + hashlib.sha256(note.encode()).hexdigest()


def append(session: Session, *, case_id: str, event: str, from_state: str | None,
           to_state: str | None, actor: str, channel: str, reason: str | None, at: datetime,
           note: str | None = None) -> None:
    """Queue an audit record; it is chained and written when the transaction commits.

    `reason` is a fixed code or phrase of ours; `note` is text a person typed, of which the record keeps
    only the digest (see the module's docstring).

    Chaining needs one writer at a time. Doing it at commit keeps that lock to the last moment of the
    transaction, so concurrent decisions wait on each other for microseconds, not for whole requests.
    """
    if note:
        reason = f"{reason}; {note_digest(note)}" if reason else note_digest(note)
    session.info.setdefault(_PENDING, []).append(dict(
        case_id=case_id, event=event, from_state=from_state, to_state=to_state, actor=actor,
        channel=channel, reason=(reason or None) and reason[:1000], at=at))


_PENDING = "recoverybot_audit_pending"


@event.listens_for(Session, "before_commit")
def _chain_pending(session: Session) -> None:
    """Chain and write the queued records, as the last thing before the commit.

    The head row's lock serialises appends, so the chain never forks. Ids are the head's last id plus
    one, given here rather than by the table's sequence, because the hash covers the id. A row that
    already holds the next id (someone wrote to the table by hand) makes the append fail rather than
    chain around it.

    On PostgreSQL one statement locks the head, chains the records, inserts them and moves the head
    (`_APPEND`). Every decision appends, so the head's lock is the one place where concurrent decisions
    queue; each round trip while it is held also waits for this thread to get the interpreter back
    from the process's other request threads, and under a burst that wait, not the SQL, made the queue.
    """
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    if session.get_bind().dialect.name == "postgresql" and _append_in_one_statement(session, pending):
        return
    head = _locked_head(session)
    new_head = head is None
    last_id, prev_hash = (0, GENESIS) if new_head else (head.last_id, head.last_hash)
    rows = []
    for fields in pending:
        last_id += 1
        rec = AuditRecord(id=last_id, prev_hash=prev_hash, hash="", **fields)
        rec.hash = prev_hash = _digest(prev_hash, _fields(rec))
        rows.append(dict(fields, id=rec.id, prev_hash=rec.prev_hash, hash=rec.hash))
    if new_head:
        session.add(AuditHead(id=1, last_id=last_id, last_hash=prev_hash))
    else:
        head.last_id, head.last_hash = last_id, prev_hash
    session.flush()
    session.execute(insert(AuditRecord).values(rows))
    if session.get_bind().dialect.name == "postgresql":  # the sequence in step, as in _APPEND
        session.execute(text("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), :id)"), {"id": last_id})


def _locked_head(session: Session) -> AuditHead | None:
    head = session.get(AuditHead, 1, with_for_update=True, populate_existing=True)
    if head is None and session.get_bind().dialect.name == "postgresql":
        # No row to lock yet (the very first append): two first appends wait on each other here, and
        # the second then finds the head the first wrote. SQLite already has one writer at a time.
        session.execute(text("SELECT pg_advisory_xact_lock(9137001)"))
        head = session.get(AuditHead, 1, with_for_update=True, populate_existing=True)
    return head


def _id_split(fields: dict) -> tuple[str, str]:
    """The JSON `_digest` hashes for a record with these fields, as the text before and after its id
    (keys are sorted, and "id" falls between "from" and "reason")."""
    body = {k: v for k, v in _fields(AuditRecord(id=0, **fields)).items() if k != "id"}
    before = json.dumps({k: v for k, v in body.items() if k < "id"}, sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False)
    after = json.dumps({k: v for k, v in body.items() if k > "id"}, sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False)
    return before[:-1] + ',"id":', "," + after[1:]


_COLUMNS = ("case_id", "event", "from_state", "to_state", "actor", "channel", "reason", "at")


def _append_in_one_statement(session: Session, pending: list[dict]) -> bool:
    """PostgreSQL: the whole append in one statement (sha256 in the database, on the same bytes as
    `_digest`). False, having changed nothing, when there is no head yet (the very first append)."""
    params, rows = {"count": len(pending)}, []
    for n, fields in enumerate(pending, start=1):
        params[f"pre{n}"], params[f"post{n}"] = _id_split(fields)
        params.update({f"{col}{n}": fields[col] for col in _COLUMNS})
        rows.append(f"({n}, CAST(:pre{n} AS text), CAST(:post{n} AS text), "
                    + ", ".join(f"CAST(:{col}{n} AS {'timestamptz' if col == 'at' else 'text'})" for col in _COLUMNS)
                    + ")")
    written = session.execute(text(_APPEND.replace("{items}", ",\n".join(rows))), params).rowcount
    if written == 0:
        return False
    for obj in list(session.identity_map.values()):
        if isinstance(obj, AuditHead):
            session.expire(obj)  # the statement moved it
    return True


_APPEND = """
WITH RECURSIVE
old AS (SELECT last_id, last_hash FROM audit_head WHERE id = 1 FOR UPDATE),
items (n, pre, post, case_id, event, from_state, to_state, actor, channel, reason, at) AS (VALUES {items}),
chain (n, id, prev, hash) AS (
    SELECT i.n, o.last_id + 1, CAST(o.last_hash AS text),
           encode(sha256(convert_to(o.last_hash || i.pre || CAST(o.last_id + 1 AS text) || i.post, 'UTF8')), 'hex')
    FROM old o JOIN items i ON i.n = 1
    UNION ALL
    SELECT i.n, c.id + 1, CAST(c.hash AS text),
           encode(sha256(convert_to(c.hash || i.pre || CAST(c.id + 1 AS text) || i.post, 'UTF8')), 'hex')
    FROM chain c JOIN items i ON i.n = c.n + 1),
-- The table's own id sequence is kept in step (setval, once per append, under the head's lock), so code
-- of an earlier release that still takes ids from it, during a rolling deploy or after a rollback,
-- cannot collide with these.
moved AS (UPDATE audit_head
          SET last_id = coalesce(setval(pg_get_serial_sequence('audit_log', 'id'), c.id), c.id), last_hash = c.hash
          FROM chain c WHERE audit_head.id = 1 AND c.n = :count)
INSERT INTO audit_log (id, case_id, event, from_state, to_state, actor, channel, reason, at, prev_hash, hash)
SELECT c.id, i.case_id, i.event, i.from_state, i.to_state, i.actor, i.channel, i.reason, i.at, c.prev, c.hash
FROM chain c JOIN items i ON i.n = c.n
"""


@event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, previous_transaction) -> None:
    session.info.pop(_PENDING, None)


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    broken_id: int | None = None
    problem: str | None = None


def verify(session: Session) -> VerifyResult:
    prev_hash, count, last_id = GENESIS, 0, None
    for rec in session.scalars(select(AuditRecord).order_by(AuditRecord.id)).yield_per(1000):
        if rec.prev_hash != prev_hash:
            return VerifyResult(False, count, rec.id,
                                "link to the previous record is broken (a record before it was "
                                "deleted or edited)")
        if _digest(prev_hash, _fields(rec)) != rec.hash:
            return VerifyResult(False, count, rec.id, "record content does not match its hash (edited)")
        prev_hash, last_id = rec.hash, rec.id
        count += 1
    head = session.get(AuditHead, 1)
    if head is None and count:
        return VerifyResult(False, count, None, "the chain head is missing")
    if head is not None and (head.last_id != last_id or head.last_hash != prev_hash):
        return VerifyResult(False, count, head.last_id,
                            "the newest records were deleted (the chain head points past the end)")
    return VerifyResult(True, count)


def trail(session: Session, case_id: str) -> list[AuditRecord]:
    return list(session.scalars(select(AuditRecord).where(AuditRecord.case_id == case_id)
                                .order_by(AuditRecord.id)))
