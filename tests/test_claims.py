"""The queue claims read only what is waiting, however much history the tables keep.

The plans are checked on PostgreSQL with tens of thousands of rows of processed history, on tables
autovacuum has never analysed and again after ANALYZE, for the exact statements the worker sends
(captured from the engine while the real claim functions run). Each is checked as a custom plan and,
where its conditions are constants, as the generic plan PostgreSQL may switch to once psycopg has
prepared the statement (after its fifth run on a connection). Assertions are on plans, not timings.
"""
from __future__ import annotations

import re
from datetime import timedelta
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import create_engine, event, inspect, text

from benchmarks.history_seed import TABLES, seed
from recovery import db as dbmod, inbox, timers
from recovery.clock import ManualClock
from recovery.errors import DirectoryUnavailable
from recovery.models import InboxEvent
from recovery.outbox import EMAIL_LANE, OTHER_LANE
from tests.conftest import PG_ADMIN_URL, scratch_pg_database

HISTORY = 20_000
WAITING = {"ix_inbox_pending_id", "ix_inbox_pending_conversation", "ix_timers_open_due", "ix_outbox_pending_id"}
PARTIAL = {"inbox_events": {"ix_inbox_pending_id", "ix_inbox_pending_conversation"},
           "timers": {"ix_timers_open_due"},
           "outbox": {"ix_outbox_pending_id"}}


@pytest.fixture(scope="module")
def history_url():
    """A database of its own (autovacuum off on the seeded tables, so they stay never-analysed until a
    test analyses them), with HISTORY rows of finished work in each table and a little waiting work."""
    with scratch_pg_database("rb_claims") as url:
        yield _seeded(url)


def _seeded(url: str) -> str:
    dbmod.upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        seed(conn, 1, HISTORY)
        conn.execute(text("""
            INSERT INTO inbox_events (delivery_key, source, conversation_key, payload, received_at, attempts)
            SELECT 'waiting:' || i, 'webchat', 'webchat:waiting' || (i % 7), '{}', now(), 0
            FROM generate_series(1, 40) AS i"""))
        conn.execute(text("""
            INSERT INTO outbox (kind, idempotency_key, payload_enc, status, attempts, next_attempt_at,
                                created_at)
            SELECT (ARRAY['email','chat'])[1 + i % 2], 'waiting:' || i, 'x', 'pending', 1,
                   now() + interval '1 hour', now()
            FROM generate_series(1, 40) AS i"""))
        conn.execute(text("""
            INSERT INTO timers (case_id, kind, due_at)
            SELECT id, 'code_expiry', now() + interval '1 hour' FROM cases ORDER BY id LIMIT 40"""))
    engine.dispose()
    return url


def claim_statements(container) -> dict[str, tuple[str, dict]]:
    """Runs the real claims once and returns the locking SELECT each sent, with its parameters."""
    sent: list[tuple[str, dict]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "FOR UPDATE" in statement:
            sent.append((statement, dict(parameters or {})))

    event.listen(container.db.engine, "before_cursor_execute", record)
    try:
        assert inbox.process_one(container.db, lambda session, ev: None, container.clock.now)
        with container.db.transaction() as session:
            assert timers.claim_due(session, container.clock.now(), postgres=True) is None
        assert container.dispatcher.run_once(50, OTHER_LANE) == 0
        assert container.dispatcher.run_once(50, EMAIL_LANE) == 0
    finally:
        event.remove(container.db.engine, "before_cursor_execute", record)
    found = {}
    for statement, params in sent:
        table = re.search(r"\bFROM (\w+)", statement).group(1)
        found.setdefault(table, []).append((statement, params))
    assert set(found) == set(PARTIAL), found.keys()
    return found


def explain(url: str, statement: str, params: dict, mode: str) -> list[str]:
    """The plan PostgreSQL makes for the statement prepared as psycopg prepares it; `mode` is
    force_custom_plan, force_generic_plan, or auto after six runs (when the plan cache has chosen)."""
    names: list[str] = []

    def number(match):
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", number, statement)
    values = [params[n] for n in names]
    args = f"({', '.join(['%s'] * len(values))})" if values else ""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute(f"SET LOCAL plan_cache_mode = {'auto' if mode == 'auto' else mode}")
        cur.execute("PREPARE claim AS " + sql)
        if mode == "auto":
            for _ in range(6):
                cur.execute(f"EXECUTE claim{args}", values)
        cur.execute(f"EXPLAIN EXECUTE claim{args}", values)
        plan = [row[0] for row in cur.fetchall()]
        conn.rollback()
    return plan


def indexes_read(plan: list[str], table: str) -> set[str]:
    """How the plan reads `table`: the index names, or "Seq Scan"."""
    read = set()
    for line in plan:
        if re.search(rf"Seq Scan on {table}\b", line):
            read.add("Seq Scan")
        match = re.search(rf"Index (?:Only )?Scan using (\w+) on {table}\b", line)
        if match:
            read.add(match.group(1))
    for line in plan:  # a bitmap scan names its index on a line of its own
        match = re.search(r"Bitmap Index Scan on (\w+)", line)
        if match and match.group(1).startswith(("ix_inbox", "ix_timers", "ix_outbox", table)):
            read.add(match.group(1))
    return read


def modes(table: str) -> tuple[str, ...]:
    # The outbox lease compares `status` with a bound parameter, which a generic plan cannot match to
    # the partial index's `status = 'pending'`; the plan cache keeps custom plans for it (checked by
    # "auto"), since the generic plan's estimate is a walk of the whole table.
    if table == "outbox":
        return ("force_custom_plan", "auto")
    return ("force_custom_plan", "force_generic_plan", "auto")


def test_claims_read_only_the_partial_indexes_before_and_after_analyze(history_url, make_container):
    c = make_container(history_url)
    claims = claim_statements(c)
    engine = create_engine(history_url)
    with engine.connect() as conn:
        never = conn.execute(text("SELECT relname FROM pg_stat_user_tables WHERE relname IN "
                                  "('inbox_events', 'timers', 'outbox') AND last_analyze IS NULL "
                                  "AND last_autoanalyze IS NULL")).scalars().all()
    assert sorted(never) == ["inbox_events", "outbox", "timers"]

    for stage in ("never analysed", "analysed"):
        if stage == "analysed":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE"))
        for table, statements in claims.items():
            for statement, params in statements:
                for mode in modes(table):
                    plan = explain(history_url, statement, params, mode)
                    read = indexes_read(plan, table)
                    assert read and read <= PARTIAL[table], (stage, table, mode, "\n".join(plan))
    engine.dispose()


def test_the_partial_indexes_hold_only_waiting_rows(history_url):
    """The indexes stay the size of the queue: the history seeded is in none of them."""
    engine = create_engine(history_url)
    with engine.connect() as conn:
        size = {name: conn.scalar(text(f"SELECT count(*) FROM {table} WHERE {where}"))
                for name, table, where in [
                    ("inbox", "inbox_events", "processed_at IS NULL"),
                    ("timers", "timers", "fired_at IS NULL AND cancelled_at IS NULL"),
                    ("outbox", "outbox", "status = 'pending'")]}
        pages = {row.relname: row.relpages for row in conn.execute(text(
            "SELECT relname, relpages FROM pg_class WHERE relname IN "
            "('ix_inbox_pending_id', 'ix_timers_open_due', 'ix_outbox_pending_id', 'inbox_events_pkey')"))}
    engine.dispose()
    assert all(0 < n <= 40 for n in size.values()), size
    assert max(pages[n] for n in ("ix_inbox_pending_id", "ix_timers_open_due", "ix_outbox_pending_id")) <= 2
    assert pages["inbox_events_pkey"] > 20, pages  # the history is there, in the full indexes


def _store(c, now, events: list[tuple[str, str]]) -> None:
    """Store (delivery key, conversation) events, each with its key as the payload."""
    for key, conversation in events:
        assert inbox.store(c.db, source="test", delivery_key=key, conversation_key=conversation,
                           payload={"key": key}, now=now)


def _drain(c, handler, clock) -> None:
    """Process events until none is due now."""
    while inbox.process_one(c.db, handler, clock.now):
        pass


def test_inbox_keeps_each_conversation_in_order_through_failures(any_db_url, make_container):
    """A later event of a conversation waits while an earlier one is retried, and goes once the earlier
    one is handled or given up on (MAX_ATTEMPTS); other conversations go in id order meanwhile."""
    c = make_container(any_db_url)
    now = c.clock.now()
    _store(c, now, [("a1", "a"), ("b1", "b"), ("a2", "a"), ("c1", "c"), ("c2", "c")])
    assert not inbox.store(c.db, source="test", delivery_key="a1", conversation_key="a",
                           payload={"key": "again"}, now=now + timedelta(seconds=1))
    handled: list[str] = []
    fails = {"a1": 2, "c1": inbox.MAX_ATTEMPTS}  # a1 succeeds on its third try; c1 never does

    def handler(session, ev):
        key = ev.payload["key"]
        handled.append(key)
        if fails.get(key, 0) > 0:
            fails[key] -= 1
            raise RuntimeError(f"{key} failed")

    _drain(c, handler, c.clock)
    assert handled == ["a1", "a1", "a1", "b1", "a2"] + ["c1"] * inbox.MAX_ATTEMPTS + ["c2"]
    with c.db.transaction() as session:
        rows = {e.delivery_key: e for e in session.query(InboxEvent)}
        assert rows["a1"].payload == {"key": "a1"}  # the redelivery changed nothing
        assert rows["c1"].processed_at is None and rows["c1"].attempts == inbox.MAX_ATTEMPTS
        assert all(rows[k].processed_at is not None for k in ("a1", "b1", "a2", "c2"))


def test_an_event_failed_by_an_unavailable_service_waits_before_its_next_attempt(any_db_url, make_container):
    """A DirectoryUnavailable (the account API not answering) holds the event back for OUTAGE_RETRY_SECONDS
    instead of using up its attempts at once; its conversation waits behind it, others go on; it is
    handled once the service answers, and parked only after MAX_ATTEMPTS spread over minutes."""
    clock = ManualClock()
    c = make_container(any_db_url, clock=clock)
    _store(c, clock.now(), [("a1", "a"), ("b1", "b"), ("a2", "a"), ("c1", "c")])
    handled: list[str] = []
    down = {"a1": 1, "c1": inbox.MAX_ATTEMPTS}  # a1's service answers on the second try; c1's never

    def handler(session, ev):
        key = ev.payload["key"]
        handled.append(key)
        if down.get(key, 0) > 0:
            down[key] -= 1
            raise DirectoryUnavailable("account lookup by email: HTTP 503, the backend is unavailable")

    def row(key: str):
        with c.db.reading() as session:
            e = session.query(InboxEvent).filter_by(delivery_key=key).one()
            return SimpleNamespace(retry_at=e.retry_at, processed_at=e.processed_at, attempts=e.attempts,
                                   last_error=e.last_error)

    _drain(c, handler, clock)
    assert handled == ["a1", "b1", "c1"]  # a2 waits behind a1
    assert row("a1").retry_at == clock.now() + timedelta(seconds=inbox.OUTAGE_RETRY_SECONDS[0])
    clock.advance(seconds=inbox.OUTAGE_RETRY_SECONDS[0] - 1)
    _drain(c, handler, clock)
    assert handled == ["a1", "b1", "c1"]  # not yet
    clock.advance(seconds=1)
    _drain(c, handler, clock)
    assert handled == ["a1", "b1", "c1", "a1", "a2", "c1"]  # in id order
    assert row("a1").processed_at is not None and row("a1").attempts == 1
    for wait in inbox.OUTAGE_RETRY_SECONDS[1:]:
        assert row("c1").retry_at == clock.now() + timedelta(seconds=wait)
        clock.advance(seconds=wait)
        _drain(c, handler, clock)
    failed = row("c1")
    assert handled.count("c1") == inbox.MAX_ATTEMPTS
    assert failed.processed_at is None and failed.attempts == inbox.MAX_ATTEMPTS and "503" in failed.last_error


def test_a_failing_preparation_is_counted_and_held_back_and_the_queue_goes_on(any_db_url, make_container):
    """A `prepare` step (network calls before the transaction) that raises used to fail the whole pass
    without counting an attempt, so the next pass peeked the same event first and every conversation
    waited for as long as that service failed. It now counts an attempt and holds that event back."""
    clock = ManualClock()
    c = make_container(any_db_url, clock=clock)
    _store(c, clock.now(), [("x1", "x"), ("y1", "y"), ("x2", "x")])
    failing, handled = {"x1"}, []

    class Handler:
        def prepare(self, source, payload):
            if payload["key"] in failing:
                raise RuntimeError("users.lookupByEmail: ratelimited")
            return payload["key"]

        def __call__(self, session, event, prepared):
            handled.append(prepared)

    _drain(c, Handler(), clock)
    assert handled == ["y1"]  # x2 waits behind x1
    with c.db.reading() as session:
        x1 = session.query(InboxEvent).filter_by(delivery_key="x1").one()
        assert (x1.attempts, x1.processed_at) == (1, None) and "ratelimited" in x1.last_error
        assert x1.retry_at == clock.now() + timedelta(seconds=inbox.OUTAGE_RETRY_SECONDS[0])
    failing.clear()
    clock.advance(seconds=inbox.OUTAGE_RETRY_SECONDS[0])
    _drain(c, Handler(), clock)
    assert handled == ["y1", "x1", "x2"]


@pytest.fixture(params=["sqlite", "postgres"])
def migrated_url(request, tmp_path):
    """A database of its own, migrated to head, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'migrated.db'}"
        dbmod.upgrade(url)
        yield url
        return
    with scratch_pg_database("rb_migrated") as url:
        dbmod.upgrade(url)
        yield url


def test_migrations_build_the_partial_indexes_the_models_declare(migrated_url):
    """Migration 0009 builds each partial index with the predicate recovery/models.py gives it, it goes
    down to 0008 and up again, and the migrated schema has what the models declare."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from recovery.models import Base

    command.downgrade(dbmod.alembic_config(migrated_url), "0008")
    engine = create_engine(migrated_url)
    with engine.connect() as conn:
        old = {ix["name"] for t in ("inbox_events", "timers", "outbox") for ix in inspect(conn).get_indexes(t)}
    assert {"ix_inbox_pending", "ix_timers_due", "ix_outbox_ready"} <= old and not old & WAITING
    command.upgrade(dbmod.alembic_config(migrated_url), "head")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if conn.dialect.name == "postgresql":
            built = dict(conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN "
                                           "('ix_inbox_pending_id', 'ix_inbox_pending_conversation', "
                                           "'ix_timers_open_due', 'ix_outbox_pending_id')")).all())
        else:
            built = dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'")).all())
    engine.dispose()
    declared = {ix.name: ix for table in Base.metadata.tables.values() for ix in table.indexes}
    for name in WAITING:
        where = str(declared[name].dialect_options[conn.dialect.name]["where"])
        words = re.findall(r"\w+|'\w+'", where)
        predicate = re.sub(r"::\w+", "", built[name].split(" WHERE ", 1)[1])  # PostgreSQL's added casts
        assert re.findall(r"\w+|'\w+'", predicate) == words, (name, built[name])
    assert not {"ix_inbox_pending", "ix_timers_due", "ix_outbox_ready"} & set(declared)


def test_history_benchmark_runs_small(pg_server_url, tmp_path):
    """benchmarks/history.py end to end at a small size: both measurements complete without errors and the
    claim plans it prints read the partial indexes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "history.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "history.py"), "--rows", "3000",
                          "--messages", "8", "--concurrency", "2", "--pg-admin-url", PG_ADMIN_URL,
                          "--json", str(out)], capture_output=True, text=True, timeout=180, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ratio 3,000 ÷ 1,000: p50" in run.stdout
    result = json.loads(out.read_text())
    assert result["small"]["e2e"]["count"] == 8 and result["large"]["e2e"]["count"] == 8
    assert result["sizes"]["inbox_events"] >= 3000 and result["sizes"]["timers"] == 3000
    plans = {name: "\n".join(plan) for name, plan in result["plans"].items()}
    assert "ix_inbox_pending_id" in plans["inbox claim"]
    assert "ix_timers_open_due" in plans["timers claim"]
    assert "ix_outbox_pending_id" in plans["outbox lease"]


def test_drain_benchmark_runs_small(pg_server_url, tmp_path):
    """benchmarks/drain.py end to end at a small size, with the Intercom channel configured (the handler's
    prepare step): one and two real worker processes each drain the backlog (one round here, to keep the
    suite short; the default two go 1, 2, 2, 1), every message answered, each conversation in order."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "drain.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "drain.py"), "--events", "24", "--rounds", "1",
                          "--intercom", "--pg-admin-url", PG_ADMIN_URL, "--json", str(out)],
                         capture_output=True, text=True, timeout=180, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ratio 2 workers ÷ 1:" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert [(r["round"], r["workers"]) for r in results] == [(0, 1), (0, 2)]
    assert "each round: " in run.stdout
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from drain import order
    finally:
        sys.path.remove(str(root / "benchmarks"))
    assert order(2, 2) == [(0, 1), (0, 2), (1, 2), (1, 1)]  # rising, then falling
    assert order(3, 3) == [(0, 1), (0, 2), (0, 3), (1, 3), (1, 2), (1, 1), (2, 1), (2, 2), (2, 3)]
    for r in results:
        assert r["events"] == 24 and r["replies"] >= 24 and r["failed"] == 0 and r["out_of_order"] == 0
