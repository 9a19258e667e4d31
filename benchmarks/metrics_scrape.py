"""What a /metrics scrape costs when the database is large.

    python benchmarks/metrics_scrape.py [--rows 1000000] [--db postgres|sqlite|both]

Fills a scratch database with ROWS audit records (ten per case: opened, verified, approved, completed,
with refusals and denials among them), a tenth as many cases, and inbox and outbox rows in proportion;
then times the database collector (bot/metrics.py) as a scrape would run it:

- first read: the whole audit log is tallied once per process;
- steady read: nothing new, so only the queue counts and an empty audit window;
- after 1,000 new records: the queue counts plus a window of 1,000;
- and a small write transaction, alone and while a web process's first tally runs beside it (reads take
  no write lock, so decisions are not held up).

The baseline, measured in the same run, is one `SELECT 1` round trip to the same database; each line
prints the median and its ratio to that baseline. A scrape served from the cache (within 5 s of the
last read) does no database work at all.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.metrics import DatabaseCollector  # noqa: E402
from recovery import db as dbmod  # noqa: E402
from recovery.clock import Clock  # noqa: E402

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
EVENTS = ["open", "start_checks", "request_approval", "approval_refused", "approval", "approve",
          "send_link", "complete", "approval", "deny"]
STATES = {"open": (None, "opened"), "start_checks": ("opened", "verifying"),
          "request_approval": ("verifying", "awaiting_approval"), "approval_refused": ("awaiting_approval",) * 2,
          "approval": ("awaiting_approval",) * 2, "approve": ("awaiting_approval", "approved"),
          "send_link": ("approved", "link_sent"), "complete": ("link_sent", "completed"),
          "deny": ("awaiting_approval", "denied")}


def _case_expr(column: str, mapping: dict) -> str:
    whens = " ".join(f"WHEN {i} THEN {v}" for i, v in mapping.items())
    return f"CASE {column} {whens} END"


def fill(url: str, rows: int) -> None:
    """Audit rows via one INSERT ... SELECT over a generated series (fast on both databases)."""
    engine = create_engine(url)
    series = ("SELECT generate_series(1, :n) AS r" if url.startswith("postgresql")
              else "WITH RECURSIVE s(r) AS (SELECT 1 UNION ALL SELECT r + 1 FROM s WHERE r < :n) SELECT r FROM s")
    q = lambda v: "NULL" if v is None else f"'{v}'"  # noqa: E731
    event = _case_expr("(r % 10)", {i: q(e) for i, e in enumerate(EVENTS)})
    source = _case_expr("(r % 10)", {i: q(STATES[e][0]) for i, e in enumerate(EVENTS)})
    target = _case_expr("(r % 10)", {i: q(STATES[e][1]) for i, e in enumerate(EVENTS)})
    reason = _case_expr("(r % 10)", {3: "'not_authorized'", 9: "'story did not add up'"})
    ts = ("TIMESTAMPTZ '2026-01-01 00:00:00+00' + (r * INTERVAL '7 seconds')" if url.startswith("postgresql")
          else "datetime('2026-01-01 00:00:00', '+' || (r * 7) || ' seconds')")
    with engine.begin() as conn:
        conn.execute(text(f"""
            INSERT INTO audit_log (case_id, event, from_state, to_state, actor, channel, reason, at, prev_hash, hash)
            SELECT 'RC-' || (r / 10), {event}, {source}, {target}, 'system', 'system', {reason}, {ts}, '', ''
            FROM ({series}) AS g"""), {"n": rows})
        conn.execute(text(f"""
            INSERT INTO cases (id, state, channel, conversation_id, opened_by, locale, risk_reasons, code_failures,
                               code_sends, link_failures, version, created_at, updated_at)
            SELECT 'RC-' || r, CASE WHEN r % 500 = 0 THEN 'awaiting_approval' ELSE 'completed' END, 'webchat',
                   'webchat:' || r, 'customer', 'en', '[]', 0, 1, 0, 1, {ts}, {ts}
            FROM ({series}) AS g"""), {"n": rows // 10})
        conn.execute(text(f"""
            INSERT INTO inbox_events (delivery_key, source, conversation_key, payload, received_at, processed_at, attempts)
            SELECT 'k' || r, 'webchat', 'webchat:' || (r / 3), '{{}}', {ts},
                   CASE WHEN r % 20000 = 0 THEN NULL ELSE {ts} END, 0
            FROM ({series}) AS g"""), {"n": rows // 5})
        conn.execute(text(f"""
            INSERT INTO outbox (kind, idempotency_key, payload_enc, status, attempts, next_attempt_at, created_at)
            SELECT CASE r % 3 WHEN 0 THEN 'email' WHEN 1 THEN 'chat' ELSE 'staff' END, 'o' || r, 'x',
                   CASE WHEN r % 50000 = 0 THEN 'dead' WHEN r % 30000 = 0 THEN 'pending' ELSE 'sent' END, 1, {ts}, {ts}
            FROM ({series}) AS g"""), {"n": rows // 3})
        if url.startswith("postgresql"):
            conn.execute(text("ANALYZE"))
    engine.dispose()


def add_audit(url: str, n: int) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for i in range(n):
            conn.execute(text("INSERT INTO audit_log (case_id, event, from_state, to_state, actor, channel, at, "
                              "prev_hash, hash) VALUES (:c, 'approve', 'awaiting_approval', 'approved', 'x', 'cli', "
                              "CURRENT_TIMESTAMP, '', '')"), {"c": f"RC-{i}"})
    engine.dispose()


def _write(db) -> None:
    """A small write transaction, like a rate-limit attempt a request records."""
    with db.transaction() as session:
        session.execute(text("INSERT INTO attempts (key, at) VALUES ('bench', CURRENT_TIMESTAMP)"))


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(name: str, url: str, rows: int) -> None:
    started = time.perf_counter()
    fill(url, rows)
    print(f"\n{name}: {rows:,} audit records, {rows // 10:,} cases, {rows // 5:,} inbox and {rows // 3:,} "
          f"outbox rows (filled in {time.perf_counter() - started:.0f} s)")
    db = dbmod.Database(url)
    baseline = median_ms(db.ping, 50)
    write = median_ms(lambda: _write(db), 20)
    # as a web process does it: the first tally on its own thread, while decisions keep committing
    warming = DatabaseCollector(db, Clock(), ttl=0, background=True)
    warming.collect()
    during = median_ms(lambda: _write(db), 20)
    warming._catching_up and warming._catching_up.join()
    collector = DatabaseCollector(db, Clock(), ttl=0)  # catches up in the first read, as measured
    first = median_ms(collector.collect, 1)
    steady = median_ms(collector.collect, 20)
    add_audit(url, 1000)
    after = median_ms(collector.collect, 1)
    cached = DatabaseCollector(db, Clock(), ttl=5)
    cached.collect()
    hit = median_ms(cached.collect, 200)
    print(f"  baseline SELECT 1          {baseline:9.2f} ms")
    print(f"  a write transaction        {write:9.2f} ms   {write / baseline:8.1f}x baseline")
    print(f"  the same, during the first read {during:6.2f} ms   {during / baseline:8.1f}x baseline")
    for label, value in (("first read (whole log)", first), ("steady read", steady),
                         ("after 1,000 new records", after), ("cached scrape", hit)):
        print(f"  {label:<26} {value:9.2f} ms   {value / baseline:8.1f}x baseline")
    db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["postgres", "sqlite", "both"], default="both")
    args = parser.parse_args()
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/scrape.db"
            dbmod.upgrade(url)
            measure("SQLite", url, args.rows)
    if args.db in ("postgres", "both"):
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        name = f"rb_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        try:
            dbmod.upgrade(url)
            measure("PostgreSQL", url, args.rows)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
