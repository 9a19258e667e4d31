#!/usr/bin/env python
"""Does a web-chat message cost the same with a million rows of history as with a thousand? (PostgreSQL)

    nice .venv/bin/python benchmarks/history.py                  # 1k, then 1M rows; about 70 s
    nice .venv/bin/python benchmarks/history.py --rows 20000 --messages 40      # a quick run
    options: --base-rows N  --rows N  --messages N  --concurrency C  --poll-interval S
             --stats analysed|never  --pg-admin-url URL  --json FILE

One run, one scratch database (created through --pg-admin-url and dropped afterwards), migrated to head:
  1. --base-rows (1,000) rows of finished history in every table a message touches or sits beside
     (benchmarks/history_seed.py: closed cases and their audit records, conversations, processed inbox
     events, sent outbox messages, fired and cancelled timers, chat transcripts), then VACUUM ANALYZE.
  2. The server starts as in benchmarks/webchat.py (the real app behind werkzeug, the real worker in a
     thread of the same process). C clients, each in its own chat, send "what is 2fa?" and poll until
     the bot's reply is visible: end-to-end latency, POST sent -> reply received.
  3. The same tables grow to --rows (1,000,000) rows each, with the server still up (VACUUM ANALYZE
     and a CHECKPOINT after, as autovacuum and the checkpointer would do in their own time; with
     --stats never, no ANALYZE and autovacuum off for those tables, so the planner has no statistics).
  4. The same measurement again; then EXPLAIN ANALYZE of the three queue claims at that size.
The ratio of the two p50s is the figure (target: at most 1.2). Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone

import psycopg
from sqlalchemy import create_engine, select, text
from sqlalchemy.dialects import postgresql

# benchmarks/ is on the path when run as a script
from history_seed import TABLES, counts, seed
from webchat import (PG_ADMIN_URL, QUESTION, Server, db_version, machine_busy, noise_note, phase_e2e, probe_replies,
                     scratch_database)


def grow(url: str, start: int, stop: int, analyse: bool) -> float:
    """Seeds rows start..stop, then analyses (unless told not to: autovacuum is then off for the seeded
    tables, so they stay never-analysed) and checkpoints; returns the seconds it took."""
    t0 = time.perf_counter()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if not analyse:
                for table in TABLES:
                    conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
            seed(conn, start, stop)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if analyse:
                conn.execute(text("VACUUM ANALYZE"))
            conn.execute(text("CHECKPOINT"))
    finally:
        engine.dispose()
    return time.perf_counter() - t0


def claim_queries(now: datetime) -> dict:
    """The three claims the worker runs, as it runs them on PostgreSQL. The outbox lease is written out
    here as recovery/outbox.py's Dispatcher._lease builds it (the lane of `run_forever`'s main loop)."""
    from recovery import inbox, timers
    from recovery.models import InboxEvent, OutboxMessage as O

    lease = (select(O).where(O.status == "pending", O.next_attempt_at <= now,
                             O.lease_until.is_(None) | (O.lease_until < now),
                             O.kind.not_in(("email",)))
             .order_by(O.id).limit(50).with_for_update(skip_locked=True))
    return {"inbox claim": inbox._eligible().with_for_update(skip_locked=True, of=InboxEvent).params(now=now),
            "timers claim": timers.due(now).with_for_update(skip_locked=True),
            "outbox lease": lease}


def explain(url: str, statement, *, generic: bool = False, analyze: bool = True) -> list[str]:
    """EXPLAIN of a statement prepared as the driver prepares it (psycopg prepares a statement after its
    fifth run on a connection, and PostgreSQL may then switch to a generic plan: `generic` forces one)."""
    compiled = statement.compile(dialect=postgresql.psycopg.dialect(),
                                 compile_kwargs={"render_postcompile": True})
    names: list[str] = []

    def number(match):
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", number, compiled.string)
    params = [compiled.params[n] for n in names]
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:  # rolled back on leaving: EXPLAIN ANALYZE of FOR UPDATE locks rows
        cur = psycopg.ClientCursor(conn)
        cur.execute(f"SET LOCAL plan_cache_mode = {'force_generic_plan' if generic else 'force_custom_plan'}")
        cur.execute("PREPARE claim AS " + sql)
        args = f"({', '.join(['%s'] * len(params))})" if params else ""
        cur.execute(f"EXPLAIN {'(ANALYZE) ' if analyze else ''}EXECUTE claim{args}", params)
        plan = [row[0] for row in cur.fetchall()]
        conn.rollback()
    return plan


def measure(server: Server, args, label: str) -> dict:
    expected = probe_replies(server.url, args.text)  # also warms the server up after the seeding
    busy = machine_busy()
    print(f"   {label}: {args.messages} messages, {args.concurrency} clients", file=sys.stderr)
    e2e, ack, extra = phase_e2e(server.url, args.concurrency, args.messages, args.poll_interval, 0.0,
                                args.text, expected)
    return {"e2e": e2e, "ack": ack, "busy_before": busy, "polls": extra["polls"]}


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="rb-history-") as workdir, \
            scratch_database("postgres", workdir, args.pg_admin_url) as url:
        version = db_version("postgres", url)
        print(f"== seeding {args.base_rows} rows per table", file=sys.stderr)
        seed_small = grow(url, 1, args.base_rows, args.stats == "analysed")
        server = Server(url, workdir, idle_sleep=None)
        try:
            server.start_worker()
            small = measure(server, args, f"{args.base_rows:,} rows")
            print(f"== growing to {args.rows:,} rows per table", file=sys.stderr)
            seed_large = grow(url, args.base_rows + 1, args.rows, args.stats == "analysed")
            large = measure(server, args, f"{args.rows:,} rows")
        finally:
            server.stop()
        engine = create_engine(url)
        with engine.connect() as conn:
            sizes = counts(conn)
        engine.dispose()
        now = datetime.now(timezone.utc)
        plans = {name: explain(url, q) for name, q in claim_queries(now).items()}
        generic = {name: explain(url, q, generic=True) for name, q in claim_queries(now).items()}
    return {"version": version, "small": small, "large": large, "seed_small_s": seed_small,
            "seed_large_s": seed_large, "sizes": sizes, "plans": plans, "generic_plans": generic}


def execution_ms(plan: list[str]) -> str:
    line = next((l for l in plan if l.startswith("Execution Time")), "")
    return line.split(":", 1)[1].strip() if line else "?"


def render(res: dict, args) -> str:
    s, l = res["small"]["e2e"], res["large"]["e2e"]
    lines = [f"History benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, {res['version']}; "
             f"web chat end-to-end (POST -> reply visible), {args.concurrency} clients, {args.messages} "
             f"messages per size, poll every {args.poll_interval * 1e3:.0f} ms; tables {args.stats}.",
             "",
             "| rows per table | n | err | msgs/s | p50 ms | p99 ms | seeding s |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {args.base_rows:,} | {s.count} | {s.errors} | {s.per_s:.1f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | "
             f"{res['seed_small_s']:.1f} |",
             f"| {args.rows:,} | {l.count} | {l.errors} | {l.per_s:.1f} | {l.p50_ms:.1f} | {l.p99_ms:.1f} | "
             f"{res['seed_large_s']:.1f} |",
             "",
             f"ratio {args.rows:,} ÷ {args.base_rows:,}: p50 {l.p50_ms / s.p50_ms:.2f}, "
             f"p99 {l.p99_ms / s.p99_ms:.2f}, throughput {l.per_s / s.per_s:.2f} (target: p50 at most 1.2)",
             "rows at the end: " + ", ".join(f"{t} {n:,}" for t, n in res["sizes"].items())]
    note = noise_note(res["small"]["busy_before"], res["large"]["busy_before"])
    if note:
        lines.append(note)
    lines.append("")
    lines.append(f"Claims at {args.rows:,} rows, EXPLAIN ANALYZE (custom plan; generic plan time in brackets):")
    for name, plan in res["plans"].items():
        lines.append(f"-- {name}: {execution_ms(plan)} ({execution_ms(res['generic_plans'][name])} generic)")
        lines.extend("   " + row for row in plan)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-rows", type=int, default=1000, help="rows per table for the baseline (1000)")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows per table for the comparison (1000000)")
    p.add_argument("--messages", type=int, default=400, help="messages per size (400)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (4)")
    p.add_argument("--poll-interval", type=float, default=0.01, help="client wait between empty polls, s")
    p.add_argument("--text", default=QUESTION, help=f"the customer message (default {QUESTION!r})")
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL,
                   help="PostgreSQL URL used to create and drop the scratch database (env BENCH_PG_ADMIN_URL)")
    p.add_argument("--stats", choices=["analysed", "never"], default="analysed",
                   help="VACUUM ANALYZE after seeding (default), or leave the tables never analysed, with "
                        "autovacuum off for them, as a new deployment's tables are before autovacuum's turn")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.base_rows < 4 or args.rows <= args.base_rows or args.base_rows % 4:
        p.error("--base-rows must be a positive multiple of 4 and --rows larger than it")
    if args.messages < 1 or args.concurrency < 1:
        p.error("--messages and --concurrency must be at least 1")
    started = time.perf_counter()
    res = run(args)
    print(render(res, args))
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(), **res,
                       "small": {**res["small"], "e2e": asdict(res["small"]["e2e"]),
                                 "ack": asdict(res["small"]["ack"])},
                       "large": {**res["large"], "e2e": asdict(res["large"]["e2e"]),
                                 "ack": asdict(res["large"]["ack"])}}, f, indent=2)
    failed = res["small"]["e2e"].errors or res["large"]["e2e"].errors
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
