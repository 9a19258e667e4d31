#!/usr/bin/env python
"""Benchmark of `keys rotate` and `purge`, on SQLite and on PostgreSQL, each against a baseline measured in
the same run on the same data.

    .venv/bin/python benchmarks/retention.py             # both databases, 20,000 rows, about a minute
    .venv/bin/python benchmarks/retention.py --rows 2000 --db sqlite
    options: --db sqlite|postgres|both  --rows N  --batch N  --pg-admin-url URL

rotate   N outbox payloads (300 bytes each) encrypted under an old key are re-encrypted by
         recovery.keys.rotate (batches of --batch rows, one transaction each, rows locked on PostgreSQL).
         Baseline: cryptography's MultiFernet.rotate over the same N tokens in memory, no database: the
         cryptographic floor. A second run (nothing left to do: every value is checked and skipped) shows
         what resuming costs.
purge    N/4 closed cases, each with a web chat conversation (session, 4 lines), 2 inbox events, 3 sent
         outbox messages and a document, all past a 0-day retention, are removed by
         recovery.retention.purge (the plan, then batches of 500 ids). Baseline: plain DELETEs of every row
         of those tables, one statement per table, in one transaction: the least work that removes the
         same rows. On SQLite the baseline is also timed with secure_delete off, which shows what zeroing
         freed pages (the product's setting) costs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import delete, insert, text

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from webchat import PG_ADMIN_URL, scratch_database  # noqa: E402 - benchmarks/ is on the path as a script

from recovery import keys, retention  # noqa: E402
from recovery.clock import Clock  # noqa: E402
from recovery.crypto import Keyring  # noqa: E402
from recovery.db import Database  # noqa: E402
from recovery.models import (Case, CaseDocument, ChatMessage, ChatSession, Conversation, InboxEvent,  # noqa: E402
                             OutboxMessage)

OLD = "bench-old-key-0123456789-abcdefghijklmnopqrstuv"
NEW = "bench-new-key-0123456789-abcdefghijklmnopqrstuv"
PAYLOAD = {"template": "approved", "to": "someone@example.com", "locale": "en",
           "context": {"case_id": "RC-BENCH000", "cancel_url": "https://x.example/cancel/" + "t" * 43,
                       "notice_hours": 24, "hold_hours": 48, "note": "x" * 80}}
CHUNK = 2000


def insert_chunked(db: Database, model, rows: list[dict]) -> None:
    for i in range(0, len(rows), CHUNK):
        with db.transaction() as s:
            s.execute(insert(model), rows[i:i + CHUNK])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- rotate ----------------------------------------------------------------------------------------

def bench_rotate(url: str, n: int, batch: int) -> dict:
    db = Database(url)
    old = Keyring(OLD)
    now = datetime.now(timezone.utc)
    tokens = [old.encrypt_json(PAYLOAD | {"n": i}) for i in range(n)]
    insert_chunked(db, OutboxMessage, [
        {"kind": "email", "idempotency_key": f"bench:{i}", "payload_enc": t, "status": "sent", "attempts": 1,
         "next_attempt_at": now, "created_at": now, "sent_at": now} for i, t in enumerate(tokens)])
    multi = MultiFernet([Fernet(k) for k in (Fernet.generate_key(), Fernet.generate_key())])
    floor_tokens = [multi._fernets[1].encrypt(old.decrypt(t).encode()) for t in tokens]
    baseline = timed(lambda: [multi.rotate(t) for t in floor_tokens])
    both = Keyring(NEW, [OLD])
    real = timed(lambda: keys.rotate(db, both, Clock(), batch=batch))
    resume = timed(lambda: keys.rotate(db, both, Clock(), batch=batch))
    db.dispose()
    return {"baseline": baseline, "real": real, "resume": resume}


# ---- purge ----------------------------------------------------------------------------------------

def fill_closed_cases(db: Database, cases: int) -> None:
    now = datetime.now(timezone.utc)
    closed = now - timedelta(days=2)
    sealed = Keyring(OLD).encrypt("y" * 600)
    ids = [f"RC-{i:08d}" for i in range(cases)]
    keys_ = [f"webchat:bench{i}" for i in range(cases)]
    insert_chunked(db, Case, [
        {"id": c, "state": "denied", "account_id": f"acct-{i}", "channel": "webchat", "conversation_id": k,
         "opened_by": "customer", "locale": "en", "risk_reasons": [], "final_reason": "bench",
         "code_failures": 0, "code_sends": 1, "link_failures": 0, "version": 3, "created_at": closed,
         "updated_at": closed, "closed_at": closed} for i, (c, k) in enumerate(zip(ids, keys_))])
    insert_chunked(db, Conversation, [
        {"key": k, "channel": "webchat", "locale": "en", "stage": "idle", "case_id": c, "data": {},
         "created_at": closed, "updated_at": closed} for c, k in zip(ids, keys_)])
    insert_chunked(db, ChatSession, [{"id": k.split(":")[1], "locale": "en", "created_at": closed} for k in keys_])
    insert_chunked(db, ChatMessage, [
        {"session_id": k.split(":")[1], "sender": "customer", "text": f"line {j} of a customer's words " * 3,
         "buttons": [], "created_at": closed} for k in keys_ for j in range(4)])
    insert_chunked(db, InboxEvent, [
        {"delivery_key": f"{k}:{j}", "source": "webchat", "conversation_key": k,
         "payload": {"text_redacted": "words " * 10}, "received_at": closed, "processed_at": closed,
         "attempts": 0} for k in keys_ for j in range(2)])
    insert_chunked(db, OutboxMessage, [
        {"kind": "email", "idempotency_key": f"{c}:{j}", "payload_enc": sealed, "status": "sent",
         "attempts": 1, "next_attempt_at": closed, "created_at": closed, "sent_at": closed, "case_id": c}
        for c in ids for j in range(3)])
    insert_chunked(db, CaseDocument, [
        {"case_id": c, "conversation_key": k, "name": "id.png", "content_type": "image/png", "size": 600,
         "sha256": "0" * 64, "content_enc": sealed, "received_at": closed} for c, k in zip(ids, keys_)])


def plain_deletes(db: Database, secure_delete: bool) -> None:
    with db.transaction() as s:
        if not db.is_postgres:
            s.execute(text(f"PRAGMA secure_delete={'ON' if secure_delete else 'OFF'}"))
        for model in (ChatMessage, ChatSession, Conversation, CaseDocument, InboxEvent, OutboxMessage):
            s.execute(delete(model))


def bench_purge(kind: str, workdir: str, pg_admin_url: str, cases: int) -> dict:
    policy = retention.Retention(transcripts=0, documents=0, events=0, cases=0)
    out = {}
    variants = [("baseline", True)] + ([("baseline, secure_delete off", False)] if kind == "sqlite" else [])
    for name, secure in variants + [("real", None)]:
        with tempfile.TemporaryDirectory(dir=workdir) as sub, scratch_database(kind, sub, pg_admin_url) as url:
            db = Database(url)
            fill_closed_cases(db, cases)
            if secure is None:
                out[name] = timed(lambda: retention.purge(db, policy, datetime.now(timezone.utc), trigger="cli"))
            else:
                out[name] = timed(lambda: plain_deletes(db, secure))
            db.dispose()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--rows", type=int, default=20000, help="outbox payloads to rotate; purge uses rows/4 cases")
    p.add_argument("--batch", type=int, default=keys.BATCH)
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    args = p.parse_args(argv)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    cases = max(1, args.rows // 4)
    for kind in kinds:
        with tempfile.TemporaryDirectory() as workdir:
            with scratch_database(kind, workdir, args.pg_admin_url) as url:
                r = bench_rotate(url, args.rows, args.batch)
            print(f"{kind}: keys rotate, {args.rows} values, batches of {args.batch}")
            print(f"  baseline (MultiFernet.rotate in memory) {r['baseline']:7.2f} s  "
                  f"{args.rows / r['baseline']:9.0f} values/s")
            print(f"  keys rotate                             {r['real']:7.2f} s  {args.rows / r['real']:9.0f} "
                  f"values/s  {r['real'] / r['baseline']:5.2f}x baseline")
            print(f"  keys rotate again (all current)         {r['resume']:7.2f} s  "
                  f"{r['resume'] / r['baseline']:5.2f}x baseline")
            t = bench_purge(kind, workdir, args.pg_admin_url, cases)
            rows = cases * 13
            print(f"{kind}: purge, {cases} closed cases ({rows} rows: 12 removed and the case blanked, each)")
            for name, seconds in t.items():
                print(f"  {name:<40}{seconds:7.2f} s  {rows / seconds:9.0f} rows/s  "
                      f"{seconds / t['baseline']:5.2f}x baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
