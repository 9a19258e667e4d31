#!/usr/bin/env python
"""Benchmark of Intercom webhook ingest, next to a signature-and-insert baseline, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/intercom_ingest.py [--db sqlite|postgres|both] [--events N]
                                                   [--concurrency C] [--rounds R] [--json FILE]

For each database: a fresh migrated database (SQLite: a temp file; PostgreSQL: a scratch database, dropped
afterwards) and one server process built like `recoverybot web` (bot.wiring.build + bot.web.create_app
behind werkzeug's threaded server on 127.0.0.1), with the Intercom channel on. No worker runs, so nothing
calls out (INTERCOM_API_BASE points at a closed local port anyway). Client threads in this process post
pre-signed events over keep-alive connections, C at a time, N per phase.

Two routes, the same run, alternating R times (baseline, real, baseline, real, ...):
  baseline  POST /bench/intercom-baseline: verify X-Hub-Signature, insert the raw body as an inbox row.
            Registered on the app object here, in the benchmark; it is not one of the product's routes.
  real      POST /webhooks/intercom: the product's route (verify, parse JSON, find the customer's part,
            encrypt the event, insert under notification id + part id, answer).
Every event is new (its own notification and part id), so every request inserts a row.
Reported: events/s, ack latency p50/p99 (request sent -> 200 read), the server process's CPU time per
event (from /proc; steadier than wall-clock figures on a shared machine), and real/baseline ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import process_cpu_seconds  # noqa: E402 - benchmarks/ is on the path when run as a script

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "bench-secret-key-0123456789-abcdefghijklmnop"
CLIENT_SECRET = "bench-intercom-client-secret"
FIXTURE = ROOT / "tests" / "fixtures" / "intercom" / "conversation.user.replied.json"
TIMEOUT = 30.0


# ---- the server process --------------------------------------------------------------------------------

def server_main(db_url: str, port: int, workdir: str, pipe) -> None:
    import logging

    from flask import jsonify, request
    from werkzeug.serving import make_server

    from bot.intercom.webhook import SIGNATURE_HEADER, signature_ok
    from bot.web import create_app
    from bot.wiring import build
    from recovery import inbox
    from recovery.config import load_settings

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    c = build(load_settings(DATABASE_URL=db_url, SECRET_KEY=SECRET, LOG_LEVEL="WARNING",
                            MAIL_OUTBOX_DIR=os.path.join(workdir, "mail"),
                            INTERCOM_ACCESS_TOKEN="bench-token", INTERCOM_CLIENT_SECRET=CLIENT_SECRET,
                            INTERCOM_ADMIN_ID="7654321", INTERCOM_API_BASE="http://127.0.0.1:9"))
    app = create_app(c)

    def baseline():
        raw = request.get_data()
        if not signature_ok(CLIENT_SECRET, raw, request.headers.get(SIGNATURE_HEADER)):
            return jsonify(error="bad_signature"), 401
        stored = inbox.store(c.db, source="bench", delivery_key=f"bench:{uuid.uuid4().hex}",
                             conversation_key="bench:intercom", now=c.clock.now(),
                             payload={"raw": raw.decode("utf-8", "replace")})
        return jsonify(status="stored" if stored else "duplicate")

    app.add_url_rule("/bench/intercom-baseline", "bench_intercom_baseline", baseline, methods=["POST"])
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pipe.send("ready")
    try:
        pipe.recv()
    except EOFError:
        pass
    server.shutdown()
    c.close()


@contextmanager
def running_server(db_url: str, workdir: str):
    ctx = mp.get_context("spawn")
    port = free_port()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_main, args=(db_url, port, workdir, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError("the server process did not start within 60 s")
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        try:
            parent.send("stop")
        except (BrokenPipeError, OSError):
            pass
        proc.join(timeout=15)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def scratch_database(kind: str, workdir: str):
    from recovery import db as dbmod

    if kind == "sqlite":
        url = f"sqlite:///{os.path.join(workdir, 'bench.db')}"
        dbmod.upgrade(url)
        yield url, f"SQLite {sqlite3.sqlite_version} (WAL, BEGIN IMMEDIATE)"
        return
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"rb_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        version = conn.execute(text("SHOW server_version")).scalar().split()[0]
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        dbmod.upgrade(url)
        yield url, f"PostgreSQL {version}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ---- the clients ---------------------------------------------------------------------------------------

def signed_events(count: int, tag: str) -> list[tuple[bytes, dict]]:
    """`count` distinct conversation.user.replied events (one conversation per 10), signed."""
    from bot.intercom.webhook import sign

    template = json.loads(FIXTURE.read_text())
    events = []
    for i in range(count):
        event = copy.deepcopy(template)
        event["id"] = f"notif_{tag}_{i}"
        item = event["data"]["item"]
        item["id"] = f"{abs(hash(tag)) % 10 ** 6}{i // 10:07d}"
        part = item["conversation_parts"]["conversation_parts"][0]
        part["id"] = f"{i:012d}"
        part["body"] = f"<p>I lost my phone with the authenticator app.<br>Message {i}, can you help?</p>"
        body = json.dumps(event).encode()
        events.append((body, {"X-Hub-Signature": sign(CLIENT_SECRET, body), "Content-Type": "application/json"}))
    return events


cpu_seconds = process_cpu_seconds


def run_phase(url: str, events: list[tuple[bytes, dict]], concurrency: int, server_pid: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    queue = list(reversed(events))
    barrier = threading.Barrier(concurrency + 1)

    def client() -> None:
        http = requests.Session()
        mine: list[float] = []
        barrier.wait()
        while True:
            with lock:
                if not queue:
                    break
                body, headers = queue.pop()
            t0 = time.perf_counter()
            try:
                r = http.post(url, data=body, headers=headers, timeout=TIMEOUT)
                ok = r.status_code == 200 and r.json().get("status") == "stored"
            except requests.RequestException as exc:
                ok, r = False, exc
            mine.append(time.perf_counter() - t0)
            if not ok:
                with lock:
                    errors.append(str(getattr(r, "status_code", r))[:100])
        with lock:
            latencies.extend(mine)
        http.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu = time.perf_counter(), cpu_seconds(server_pid)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(server_pid) - cpu
    values = sorted(latencies)
    return {"events": len(values), "errors": len(errors), "seconds": seconds, "per_s": len(values) / seconds,
            "p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3,
            "cpu_ms": cpu * 1e3, "first_errors": errors[:3]}


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def merge(results: list[dict]) -> dict:
    """Rounds of one route together: total events over total time; latency percentiles are per round,
    so the median round's is reported (rounds alternate with the other route, so drift hits both)."""
    events = sum(r["events"] for r in results)
    per_s = events / sum(r["seconds"] for r in results)
    mid = sorted(results, key=lambda r: r["p50_ms"])[len(results) // 2]
    return {"events": events, "errors": sum(r["errors"] for r in results), "per_s": per_s,
            "p50_ms": mid["p50_ms"], "p99_ms": max(r["p99_ms"] for r in results),
            "server_cpu_ms_per_event": sum(r["cpu_ms"] for r in results) / max(1, events)}


def bench_database(kind: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="rb-bench-") as workdir, \
            scratch_database(kind, workdir) as (db_url, version), \
            running_server(db_url, workdir) as (base, pid):
        routes = {"baseline": f"{base}/bench/intercom-baseline", "real": f"{base}/webhooks/intercom"}
        for name, url in routes.items():  # warm-up: connections, imports, caches
            run_phase(url, signed_events(min(200, args.events), f"warm-{name}"), args.concurrency, pid)
        results: dict[str, list[dict]] = {"baseline": [], "real": []}
        for round_no in range(args.rounds):
            order = list(routes) if round_no % 2 == 0 else list(reversed(routes))  # neither always goes first
            for name in order:
                events = signed_events(args.events, f"{kind}-{name}-{round_no}")
                results[name].append(run_phase(routes[name], events, args.concurrency, pid))
        merged = {name: merge(rs) for name, rs in results.items()}
        b, r = merged["baseline"], merged["real"]
        return {"database": version, **merged,
                "ratio": {"per_s": r["per_s"] / b["per_s"], "p50": r["p50_ms"] / b["p50_ms"],
                          "p99": r["p99_ms"] / b["p99_ms"],
                          "cpu": r["server_cpu_ms_per_event"] / max(1e-9, b["server_cpu_ms_per_event"])},
                "problems": [e for rs in results.values() for x in rs for e in x["first_errors"]][:5]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--events", type=int, default=2000, help="events per route per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    kinds = ("sqlite", "postgres") if args.db == "both" else (args.db,)
    print(f"Intercom webhook ingest: {args.events} events x {args.rounds} rounds per route, "
          f"concurrency {args.concurrency}; Python {platform.python_version()}, {os.cpu_count()} CPUs")
    report = {}
    for kind in kinds:
        res = report[kind] = bench_database(kind, args)
        print(f"\n{res['database']}")
        print(f"  {'route':<10} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU ms/event':>20} {'errors':>7}")
        for name in ("baseline", "real"):
            s = res[name]
            print(f"  {name:<10} {s['per_s']:>9.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
                  f"{s['server_cpu_ms_per_event']:>20.2f} {s['errors']:>7}")
        q = res["ratio"]
        print(f"  real/baseline: throughput {q['per_s']:.2f}x, p50 {q['p50']:.2f}x, p99 {q['p99']:.2f}x, "
              f"server CPU per event {q['cpu']:.2f}x")
        if res["problems"]:
            print(f"  problems: {res['problems']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if any(report[k][r]["errors"] for k in report for r in ("baseline", "real")) else 0


if __name__ == "__main__":
    sys.exit(main())
