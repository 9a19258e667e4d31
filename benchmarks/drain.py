#!/usr/bin/env python
"""Do two worker processes drain a backlog faster than one? (PostgreSQL)

    nice .venv/bin/python benchmarks/drain.py                 # 2,000 events: 1, 2, 2, 1 workers; about 80 s
    nice .venv/bin/python benchmarks/drain.py --intercom      # the same with the Intercom channel configured
    options: --events N  --per-conversation M  --workers-max K  --rounds R  --intercom  --stats analysed|never
             --pg-admin-url URL  --json FILE

In R rounds (--rounds, 2), each K in 1..K (--workers-max, 2) is measured once, in rising order in the
first round and falling in the second (1, 2, 2, 1), so a machine that speeds up or slows down during
the run (this shared 2-core VM varies by a third from minute to minute) weighs on both sides alike. Each
measurement, on a fresh scratch database (created through --pg-admin-url, migrated to head, dropped
afterwards):
  1. A backlog of N web-chat messages ("what is 2fa?", one bot reply each), M per chat session, stored
     through the real routes (the real app's /chat/api endpoints, in this process, with no worker running);
     then VACUUM ANALYZE, as autovacuum does in its own time (--stats never leaves the tables unanalysed).
  2. The backlog is held back (each event's attempts set to the limit, as a dead event's are), and K real
     `recoverybot worker` processes start with the product's settings in their environment. Once every
     one of them has written its heartbeat (its first pass is done, so start-up is behind it), the events
     are released (attempts back to 0, plus the NOTIFY a stored message sends) and the clock starts.
  3. The inbox table is polled until no event waits; events/s = N / that time. Also reported: the span
     from the first to the last processed_at, and the CPU the workers, PostgreSQL's backends and the
     rest of the machine used meanwhile (from /proc), to show whether the 2 cores are the limit.
The ratio of the K-worker to the 1-worker rate, each the mean over the rounds, is the figure (target: at
least 1.8 for two workers); each round's own ratio is shown too.
Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from sqlalchemy import create_engine, func, select, text, update

# benchmarks/ is on the path when run as a script
from webchat import (PG_ADMIN_URL, QUESTION, SECRET, CpuMeter, db_version, machine_busy, noise_note,
                     scratch_database)

RECOVERYBOT = os.path.join(os.path.dirname(sys.executable), "recoverybot")
START_TIMEOUT = 60.0   # seconds for the workers to write their first heartbeat
DRAIN_TIMEOUT = 300.0  # seconds; a drain not done by then is a failure (bounded run)


def settings(url: str, workdir: str, intercom: bool) -> dict:
    """The product's settings, as a deployment would put them in the workers' environment."""
    env = {"DATABASE_URL": url, "SECRET_KEY": SECRET, "LOG_LEVEL": "WARNING", "WORKER_METRICS_PORT": "0",
           "MAIL_OUTBOX_DIR": os.path.join(workdir, "mail"), "PUBLIC_BASE_URL": "http://127.0.0.1:8000"}
    if intercom:
        # The channel is on, so the inbox handler has its `prepare` step; web-chat events make no Intercom
        # call, so the API address is never reached (a closed port: a call would fail loudly).
        env |= {"INTERCOM_ACCESS_TOKEN": "bench-token", "INTERCOM_CLIENT_SECRET": "bench-client-secret",
                "INTERCOM_ADMIN_ID": "1", "INTERCOM_API_BASE": "http://127.0.0.1:9/"}
    return env


def seed(env: dict, events: int, per_conversation: int) -> int:
    """Stores the backlog through the real web-chat routes (no worker runs in this process)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from bot.web import create_app
    from bot.wiring import build
    from recovery.config import load_settings

    c = build(load_settings(**env))
    try:
        client = create_app(c).test_client()
        stored = 0
        while stored < events:
            r = client.post("/chat/api/sessions", json={"locale": "en"})
            assert r.status_code == 201, r.get_data(as_text=True)
            session_id = r.get_json()["session_id"]
            for _ in range(min(per_conversation, events - stored)):
                r = client.post(f"/chat/api/sessions/{session_id}/messages", json={"text": QUESTION})
                assert r.status_code == 202, r.get_data(as_text=True)
                stored += 1
        return stored
    finally:
        c.close()


class Inbox:
    """Looks at the tables directly (not through the app)."""

    def __init__(self, url: str):
        from recovery.inbox import MAX_ATTEMPTS
        from recovery.models import ChatMessage, InboxEvent, WorkerHeartbeat

        self.engine = create_engine(url)
        self.E, self.C, self.H, self.limit = InboxEvent, ChatMessage, WorkerHeartbeat, MAX_ATTEMPTS

    def hold(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(update(self.E).where(self.E.processed_at.is_(None))
                                .values(attempts=self.limit)).rowcount

    def release(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(self.E).where(self.E.processed_at.is_(None)).values(attempts=0))
            conn.execute(text("SELECT pg_notify('recoverybot_work', 'inbox')"))

    def analyse(self) -> None:
        """What autovacuum does to a table that filled over a while; a backlog stored seconds ago has not
        had its turn yet, and the claim's plan differs (--stats never)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))

    def heartbeats(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(self.H))

    def waiting(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(self.E).where(self.E.processed_at.is_(None)))

    def summary(self) -> dict:
        E, C = self.E, self.C
        with self.engine.connect() as conn:
            first, last = conn.execute(select(func.min(E.processed_at), func.max(E.processed_at))).one()
            failed = conn.scalar(select(func.count()).select_from(E).where(E.last_error.is_not(None)))
            replies = conn.scalar(select(func.count()).select_from(C).where(C.source_key.is_not(None)))
            # per-conversation order: within a conversation, processing order follows arrival order
            out_of_order = conn.scalar(text(
                "SELECT count(*) FROM (SELECT processed_at, lag(processed_at) OVER "
                "(PARTITION BY conversation_key ORDER BY id) AS before FROM inbox_events) t "
                "WHERE processed_at < before"))
        return {"span_s": (last - first).total_seconds() if first and last else 0.0, "failed": failed,
                "replies": replies, "out_of_order": out_of_order}

    def sample_waits(self, into: dict) -> None:
        """Counts what the workers' backends are doing right now (pg_stat_activity), into `into`."""
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT state, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'")).all()
        for state, kind, event, query in rows:
            if state == "active":
                what = f"active, waiting on {kind}:{event}" if kind else "active, on CPU"
                if kind == "Lock":
                    what += f" ({query})"
            else:
                what = state or "?"
            into[what] = into.get(what, 0) + 1

    def backend_pids(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.scalars(text("SELECT pid FROM pg_stat_activity "
                                          "WHERE datname = current_database() "
                                          "AND pid <> pg_backend_pid()")))

    def close(self) -> None:
        self.engine.dispose()


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(workers: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="rb-drain-") as workdir, \
            scratch_database("postgres", workdir, args.pg_admin_url) as url:
        env = settings(url, workdir, args.intercom)
        print(f"== {workers} worker(s): storing {args.events} messages", file=sys.stderr)
        stored = seed(env, args.events, args.per_conversation)
        inbox = Inbox(url)
        procs: list[subprocess.Popen] = []
        try:
            held = inbox.hold()
            assert held == stored, (held, stored)
            if args.stats == "analysed":
                inbox.analyse()
            busy = machine_busy()
            procs = [subprocess.Popen([RECOVERYBOT, "worker"], env=os.environ | env, cwd=workdir,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for _ in range(workers)]
            deadline = time.monotonic() + START_TIMEOUT
            while inbox.heartbeats() < workers:
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    raise RuntimeError("a worker did not start:\n" + "\n".join(
                        p.stderr.read() if p.poll() is not None else "(still starting)" for p in procs))
                time.sleep(0.05)
            time.sleep(0.5)  # let each worker's pool connect and its listener settle
            print("   released; draining", file=sys.stderr)
            with CpuMeter(lambda: [p.pid for p in procs], inbox.backend_pids) as cpu:
                t0 = time.perf_counter()
                inbox.release()
                deadline = t0 + DRAIN_TIMEOUT
                waits: dict[str, int] = {}
                while inbox.waiting():
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"{inbox.waiting()} events still waiting after {DRAIN_TIMEOUT} s")
                    inbox.sample_waits(waits)
                    time.sleep(0.02)
                seconds = time.perf_counter() - t0
            summary = inbox.summary()
        finally:
            stop(procs)
            inbox.close()
    return {"workers": workers, "events": stored, "seconds": seconds, "per_s": stored / seconds,
            "span_per_s": stored / summary["span_s"] if summary["span_s"] else 0.0,
            "cores": cpu.cores, "busy_before": busy, "backends": waits, **summary}


def order(workers_max: int, rounds: int) -> list[tuple[int, int]]:
    """(round, workers) in the order measured: rising in even rounds, falling in odd ones."""
    ks = list(range(1, workers_max + 1))
    return [(r, k) for r in range(rounds) for k in (ks if r % 2 == 0 else ks[::-1])]


def mean_rate(results: list[dict], workers: int, key: str = "per_s") -> float:
    rates = [r[key] for r in results if r["workers"] == workers]
    return sum(rates) / len(rates)


def render(results: list[dict], args, version: str) -> str:
    lines = [f"Drain benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, {version}; "
             f"{args.events} web-chat messages ({QUESTION!r}), {args.per_conversation} per chat session; "
             f"Intercom channel {'configured' if args.intercom else 'off'}; tables {args.stats}; "
             f"{args.rounds} round(s), in the order shown.",
             "",
             "| round | workers | events | s | events/s | events/s (processed_at span) | cores: workers | "
             "postgres | this script | others | failed | out of order |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r["cores"]
        lines.append(f"| {r['round'] + 1} | {r['workers']} | {r['events']} | {r['seconds']:.2f} | {r['per_s']:.1f} | "
                     f"{r['span_per_s']:.1f} | {c['server']:.2f} | {c['postgres']:.2f} | "
                     f"{c['clients']:.2f} | "
                     f"{c['others']:.2f} | {r['failed']} | {r['out_of_order']} |")
    base, span_base = mean_rate(results, 1), mean_rate(results, 1, "span_per_s")
    lines.append("")
    for k in range(2, args.workers_max + 1):
        per_round = [next(r for r in results if r["round"] == n and r["workers"] == k)["per_s"]
                     / next(r for r in results if r["round"] == n and r["workers"] == 1)["per_s"]
                     for n in range(args.rounds)]
        lines.append(f"ratio {k} workers ÷ 1: {mean_rate(results, k) / base:.2f} over the rounds' mean rates "
                     f"(processed_at span: {mean_rate(results, k, 'span_per_s') / span_base:.2f}; each round: "
                     + ", ".join(f"{x:.2f}" for x in per_round) + "; target for 2: at least 1.8)")
    lines.append("")
    lines.append("What the workers' PostgreSQL backends were doing, sampled every 20 ms during the drain:")
    for r in results:
        total = sum(r["backends"].values()) or 1
        top = sorted(r["backends"].items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"- {r['workers']} worker(s): "
                     + "; ".join(f"{what} {n / total:.0%}" for what, n in top))
    note = noise_note(*(r["busy_before"] for r in results))
    if note:
        lines.append(note)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=2000, help="messages in the backlog (2000)")
    p.add_argument("--per-conversation", type=int, default=3, help="messages per chat session (3)")
    p.add_argument("--workers-max", type=int, default=2, help="measure 1..K worker processes (2)")
    p.add_argument("--rounds", type=int, default=2,
                   help="measure every worker count this many times, alternating the order (2: 1, 2, 2, 1)")
    p.add_argument("--intercom", action="store_true",
                   help="configure the Intercom channel (the inbox handler then has a prepare step)")
    p.add_argument("--stats", choices=["analysed", "never"], default="analysed",
                   help="VACUUM ANALYZE once the backlog is stored (default), or drain it with the tables "
                        "never analysed, as a backlog stored in the last seconds is")
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL,
                   help="PostgreSQL URL used to create and drop the scratch databases "
                        "(env BENCH_PG_ADMIN_URL)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.events < 1 or args.per_conversation < 1 or args.workers_max < 2 or args.rounds < 1:
        p.error("--events, --per-conversation and --rounds must be at least 1, --workers-max at least 2")
    if not os.path.exists(RECOVERYBOT):
        p.error(f"{RECOVERYBOT} not found: run with the project's venv python (pip install -e .)")
    started = time.perf_counter()
    version = db_version("postgres", args.pg_admin_url)
    results = [measure(k, args) | {"round": n} for n, k in order(args.workers_max, args.rounds)]
    print(render(results, args, version))
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(), "version": version, "results": results}, f,
                      indent=2)
    failed = any(r["failed"] or r["out_of_order"] or r["replies"] < r["events"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
