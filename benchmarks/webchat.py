#!/usr/bin/env python
"""Benchmark of the web chat's inbox-to-reply path, on SQLite and on PostgreSQL.

    .venv/bin/python benchmarks/webchat.py            # both databases, about 2 minutes
    .venv/bin/python benchmarks/webchat.py --quick    # a short run
    options: --db sqlite|postgres|both  --messages N  --concurrency C  --post-wait S  --wait S
             --poll-interval S  --think S
             --worker-mode thread|process  --idle-sleep S  --text TEXT  --pg-admin-url URL  --json FILE

For each database it makes a fresh, migrated database (SQLite: a temp file; PostgreSQL: a scratch
database, created through --pg-admin-url and dropped afterwards) and starts a server process like
`recoverybot serve`: the real container (bot.wiring.build) and Flask app (bot.web.create_app) behind
werkzeug's threaded `make_server` on 127.0.0.1, with the real worker (Worker.run_forever) in a thread
of that process (--worker-mode process: in a process of its own, like `recoverybot worker`).
Client threads in this process drive it over HTTP with `requests`, one keep-alive session each.

Phases, each a closed loop of C clients sharing N messages, all against the same server and database:
  (a) baseline  POST /bench/store: inbox.add in one transaction, nothing else. The route is added to
                the app object here, in the benchmark; it is not one of the product's routes.
  (b) real ack  POST /chat/api/sessions/{id}/messages, not waiting for the reply.
      The worker is not running during (a) and (b), so both measure the route alone.
  drain         the worker is started and works off the backlog (b) left: its capacity with no idle
                sleep and no HTTP traffic. Then one probe message finds how many replies a message gets.
  (c) e2e       POST the message ("what is 2fa?": one bot reply) as the chat page does, with
                "wait": 10 (--post-wait), so the answer comes when the reply is written and carries it;
                if it does not (the wait ran out, or the server had no waiting slot), poll GET
                ...?after=SEQ&wait=S (--wait, default 10), or with --wait 0 a plain poll every
                --poll-interval, until the bot's reply is visible; latency is POST sent -> reply
                received. With --post-wait 0 the POST answers at once and (b*) is its ack latency,
                under the worker and the polls.
Figures, what dominates them, and caveats: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
from sqlalchemy import create_engine, func, select, text, update

from common import CLK_TCK, collector_paused, process_cpu_seconds  # benchmarks/ is on the path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import wait_until_answers  # noqa: E402

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "bench-secret-key-0123456789-abcdefghijklmnop"
QUESTION = "what is 2fa?"
REQUEST_TIMEOUT = 30.0   # seconds, per HTTP request
REPLY_TIMEOUT = 30.0     # seconds to wait for one bot reply before counting it as an error
PHASE_TIMEOUT = 300.0    # seconds; a phase that is not done by then is abandoned (bounded run)


# ---- the server process ------------------------------------------------------------------------------

def add_bench_routes(app, container) -> None:
    """The store-only baseline: the inbox insert the real route does, in one transaction, nothing else."""
    from flask import jsonify, request

    from recovery import inbox

    def bench_store():
        body = request.get_json(silent=True) or {}
        conversation = f"bench:{body.get('conversation', 'x')}"
        with container.db.transaction() as s:
            stored = inbox.add(s, source="bench", delivery_key=f"{conversation}:{uuid.uuid4().hex}",
                               conversation_key=conversation, now=container.clock.now(),
                               payload={"text": body.get("text", ""), "ip": request.remote_addr,
                                        "locale": "en"})
        return jsonify(accepted=True, duplicate=not stored), 202

    app.add_url_rule("/bench/store", "bench_store", bench_store, methods=["POST"])


def make_container(db_url: str, port: int, workdir: str, idle_sleep: float | None):
    import logging

    logging.basicConfig(level=logging.WARNING, format="server: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request access log lines

    from bot.wiring import build
    from recovery.config import load_settings

    c = build(load_settings(DATABASE_URL=db_url, SECRET_KEY=SECRET, LOG_LEVEL="WARNING",
                            MAIL_OUTBOX_DIR=os.path.join(workdir, "mail"),
                            PUBLIC_BASE_URL=f"http://127.0.0.1:{port}"))
    if idle_sleep is not None:
        c.worker.idle_sleep = idle_sleep
    return c


def server_main(db_url: str, port: int, workdir: str, idle_sleep: float | None, pipe,
                worker_mode: str = "thread") -> None:
    """Runs in a child process: the web server, plus (worker mode "thread") the worker in a thread of the
    same process, like `recoverybot serve`."""
    from werkzeug.serving import make_server

    from bot.startup import freeze_heap
    from bot.web import create_app

    c = make_container(db_url, port, workdir, idle_sleep)
    from bot.chatwait import SERVE_LIMIT

    app = create_app(c)
    add_bench_routes(app, c)
    server = make_server("127.0.0.1", port, app, threaded=True)
    c.chat_waiters.limit = SERVE_LIMIT  # as `recoverybot serve` sets it: a thread per request
    # The client threads stand for different customers, who have addresses of their own; here they all
    # come from 127.0.0.1, which the product would hold to 2 waiting polls.
    c.chat_waiters.per_client = SERVE_LIMIT
    if worker_mode == "thread":  # as `recoverybot serve` does: on SQLite it is the only writer
        c.chat_waiters.watch_file = c.db.is_postgres
    freeze_heap()  # as `recoverybot serve` does
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    pipe.send(("ready", c.worker.idle_sleep))
    worker = None
    try:
        while True:
            try:
                command = pipe.recv()
            except EOFError:  # the benchmark went away
                break
            if command == "start_worker" and worker is None:
                worker = threading.Thread(target=c.worker.run_forever, name="worker", daemon=True)
                worker.start()
                pipe.send("ok")
            elif command == "stop":
                break
    finally:
        c.worker.stop()
        if worker is not None:
            worker.join(timeout=10)
        server.shutdown()
        c.close()
        try:
            pipe.send("stopped")
        except (BrokenPipeError, OSError):
            pass


def worker_main(db_url: str, port: int, workdir: str, idle_sleep: float | None, pipe) -> None:
    """Runs in a child process (worker mode "process"): the worker alone, like `recoverybot worker`."""
    from bot.startup import freeze_heap

    c = make_container(db_url, port, workdir, idle_sleep)
    freeze_heap()

    def wait_for_stop():
        try:
            pipe.recv()
        except EOFError:
            pass
        c.worker.stop()

    pipe.send("ready")  # built and connected; it starts when told, so start-up is not in the figures
    try:
        if pipe.recv() == "start_worker":
            threading.Thread(target=wait_for_stop, name="control", daemon=True).start()
            pipe.send("ok")
            c.worker.run_forever()
    except EOFError:
        pass
    finally:
        c.close()


class Server:
    def __init__(self, db_url: str, workdir: str, idle_sleep: float | None, worker_mode: str = "thread"):
        self.ctx = mp.get_context("spawn")
        self.worker_mode = worker_mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_proc = self.worker_pipe = None
        self.pipe, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=server_main, args=(db_url, self.port, workdir, idle_sleep, child,
                                                               worker_mode),
                                     name="bench-server", daemon=True)
        self.proc.start()
        child.close()
        if not self.pipe.poll(60):
            self.stop()
            raise RuntimeError("the server process did not start within 60 s")
        _, self.idle_sleep = self.pipe.recv()
        wait_until_answers(self.url + "/healthz", timeout=30, interval=0.05)
        if worker_mode == "process":
            self.worker_pipe, child = self.ctx.Pipe()
            self.worker_proc = self.ctx.Process(
                target=worker_main, args=(db_url, self.port, workdir, idle_sleep, child),
                name="bench-worker", daemon=True)
            self.worker_proc.start()
            child.close()
            if not self.worker_pipe.poll(60) or self.worker_pipe.recv() != "ready":
                self.stop()
                raise RuntimeError("the worker process did not start within 60 s")

    def pids(self) -> list[int]:
        return [p.pid for p in (self.proc, self.worker_proc) if p is not None and p.pid]

    def start_worker(self) -> None:
        pipe = self.worker_pipe if self.worker_mode == "process" else self.pipe
        pipe.send("start_worker")
        if not pipe.poll(60) or pipe.recv() != "ok":
            raise RuntimeError("the worker did not start")

    def stop(self) -> None:
        if self.worker_proc is not None:
            try:
                self.worker_pipe.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.worker_proc.join(timeout=15)
            if self.worker_proc.is_alive():
                self.worker_proc.terminate()
                self.worker_proc.join(timeout=5)
        if self.proc.is_alive():
            try:
                self.pipe.send("stop")
                if self.pipe.poll(30):
                    self.pipe.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            self.proc.join(timeout=15)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- databases ----------------------------------------------------------------------------------------

@contextmanager
def scratch_database(kind: str, workdir: str, pg_admin_url: str):
    """Yields the URL of a fresh, migrated database; removes it afterwards."""
    from recovery import db as dbmod

    if kind == "sqlite":
        url = f"sqlite:///{os.path.join(workdir, 'bench.db')}"
        dbmod.upgrade(url)
        yield url  # the file goes with the temp dir
        return
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    name = f"rb_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
        dbmod.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def db_version(kind: str, url: str) -> str:
    if kind == "sqlite":
        return f"SQLite {sqlite3.sqlite_version} (WAL, BEGIN IMMEDIATE)"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return "PostgreSQL " + conn.execute(text("SHOW server_version")).scalar().split()[0]
    finally:
        engine.dispose()


# ---- measurements -------------------------------------------------------------------------------------

_proc_cpu = process_cpu_seconds


def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have been busy (not idle, not waiting on I/O), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # guest time is already in user time
        return (sum(v) - v[3] - v[4]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """How many cores were busy during a phase: the clients (this process), the server (web server and
    worker processes), PostgreSQL (the backends connected to the scratch database), and everything else
    on the machine ("others": other work on a shared machine, which is noise in the figures)."""

    def __init__(self, server_pids, pg_pids=lambda: []):
        self.server_pids, self.pg_pids = server_pids, pg_pids  # functions returning pids

    def _snapshot(self) -> dict:
        return {"t": time.perf_counter(), "clients": time.process_time(), "machine": _machine_busy_seconds(),
                "server": {pid: _proc_cpu(pid) for pid in self.server_pids()},
                "pg": {pid: _proc_cpu(pid) for pid in self.pg_pids()}}

    def __enter__(self):
        self.start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        wall = end["t"] - self.start["t"]
        used = {k: sum(v - self.start[k].get(pid, 0.0) for pid, v in end[k].items()) for k in ("server", "pg")}
        self.cores = {"clients": (end["clients"] - self.start["clients"]) / wall,
                      "server": used["server"] / wall, "postgres": used["pg"] / wall}
        machine = (end["machine"] - self.start["machine"]) / wall
        self.cores["others"] = max(0.0, machine - sum(self.cores.values()))
        return False


@dataclass
class Stats:
    label: str
    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0


SEGMENTS = ("POST -> stored", "waiting for the worker", "turn", "commit -> client poll")


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def summarize(label: str, samples: list[float], errors: int, seconds: float) -> Stats:
    values = sorted(samples)
    n = len(values)
    return Stats(label=label, count=n, errors=errors, seconds=seconds, per_s=n / seconds if seconds else 0.0,
                 p50_ms=percentile(values, 50) * 1e3, p99_ms=percentile(values, 99) * 1e3,
                 mean_ms=(sum(values) / n * 1e3) if n else float("nan"),
                 max_ms=(values[-1] * 1e3) if n else float("nan"))


@dataclass
class ClientResult:
    samples: dict = field(default_factory=dict)   # name -> list of seconds
    errors: int = 0
    notes: list = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)


def run_clients(concurrency: int, messages: int, setup, loop) -> tuple[list[ClientResult], float]:
    """C client threads share `messages` operations; returns their results and the wall time of the loops
    (from the moment all clients are set up to the moment the last one finishes)."""
    shares = [messages // concurrency + (1 if i < messages % concurrency else 0) for i in range(concurrency)]
    results = [ClientResult() for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    deadline = [time.monotonic() + PHASE_TIMEOUT + 120]  # + the time the setups may take

    def client(i: int) -> None:
        http = requests.Session()
        state = None
        try:
            state = setup(http, i)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            results[i].errors += shares[i]
            results[i].notes.append(f"setup failed: {exc!r}")
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            return
        if state is None:
            return
        for _ in range(shares[i]):
            if time.monotonic() > deadline[0]:
                results[i].notes.append("phase timeout")
                break
            try:
                loop(http, state, results[i])
            except Exception as exc:  # noqa: BLE001
                results[i].errors += 1
                if len(results[i].notes) < 3:
                    results[i].notes.append(repr(exc))
        http.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    with collector_paused():
        for t in threads:
            t.start()
        barrier.wait(timeout=120)
        start = time.perf_counter()
        for t in threads:
            t.join(timeout=PHASE_TIMEOUT + REQUEST_TIMEOUT + REPLY_TIMEOUT)
    return results, time.perf_counter() - start


def collect(results: list[ClientResult], name: str, label: str, seconds: float) -> Stats:
    samples = [s for r in results for s in r.samples.get(name, [])]
    return summarize(label, samples, sum(r.errors for r in results), seconds)


def new_chat(http: requests.Session, base: str) -> dict:
    r = http.post(f"{base}/chat/api/sessions", json={"locale": "en"}, timeout=REQUEST_TIMEOUT)
    if r.status_code != 201:
        raise RuntimeError(f"create session: {r.status_code} {r.text[:200]}")
    body = r.json()
    return {"id": body["session_id"], "after": max(m["seq"] for m in body["messages"])}


def post_message(http: requests.Session, base: str, chat: dict, message: str = QUESTION, wait: int = 0) -> str:
    """POST one message as the chat page does, with the last seq it has seen (and with `wait`, asking
    the server to hold the answer until the reply is written, up to that many seconds), and take the
    transcript lines the answer carries (this message's own, any before it, and with `wait` the reply);
    the bot lines among them are in chat["early"]. Returns its inbox delivery key (the route builds it
    from the client_id)."""
    client_id = uuid.uuid4().hex
    body = {"text": message, "client_id": client_id, "after": chat["after"]} | ({"wait": wait} if wait else {})
    r = http.post(f"{base}/chat/api/sessions/{chat['id']}/messages", json=body, timeout=REQUEST_TIMEOUT)
    if r.status_code != 202:
        raise RuntimeError(f"post message: {r.status_code} {r.text[:200]}")
    lines = r.json().get("messages", [])
    if lines:
        chat["after"] = lines[-1]["seq"]
    chat["early"] = [m for m in lines if m["sender"] == "bot"]
    return f"webchat:{chat['id']}:{client_id}"


def phase_store(base: str, concurrency: int, messages: int, message: str) -> Stats:
    def setup(http, i):
        return {"conversation": f"client{i}-{uuid.uuid4().hex[:8]}"}

    def loop(http, state, res):
        t0 = time.perf_counter()
        r = http.post(f"{base}/bench/store", json={"text": message, "conversation": state["conversation"]},
                      timeout=REQUEST_TIMEOUT)
        t1 = time.perf_counter()
        if r.status_code != 202:
            raise RuntimeError(f"bench store: {r.status_code} {r.text[:200]}")
        res.add("ack", t1 - t0)

    results, seconds = run_clients(concurrency, messages, setup, loop)
    report_notes("(a)", results)
    return collect(results, "ack", "(a) baseline store-only ack", seconds)


def phase_post(base: str, concurrency: int, messages: int, message: str) -> Stats:
    def loop(http, chat, res):
        t0 = time.perf_counter()
        post_message(http, base, chat, message)
        res.add("ack", time.perf_counter() - t0)

    results, seconds = run_clients(concurrency, messages, lambda http, i: new_chat(http, base), loop)
    report_notes("(b)", results)
    return collect(results, "ack", "(b) real POST ack", seconds)


def poll_bot_messages(http: requests.Session, base: str, chat: dict, wait: int = 0) -> tuple[list[dict], float]:
    """One GET ...?after=SEQ[&wait=S]; returns the new bot messages and when the answer arrived."""
    params = {"after": chat["after"]} | ({"wait": wait} if wait else {})
    r = http.get(f"{base}/chat/api/sessions/{chat['id']}/messages", params=params, timeout=REQUEST_TIMEOUT)
    now = time.perf_counter()
    if r.status_code != 200:
        raise RuntimeError(f"poll: {r.status_code} {r.text[:200]}")
    new = r.json()["messages"]
    if new:
        chat["after"] = new[-1]["seq"]
    return [m for m in new if m["sender"] == "bot"], now


def probe_replies(base: str, message: str, settle: float = 1.0) -> int:
    """How many bot messages one `message` produces: wait for the first, then `settle` s for any more.
    The e2e loop waits for all of them before it sends the next message, so that a late second reply
    is never taken for the answer to the next one."""
    with requests.Session() as http:
        chat = new_chat(http, base)
        post_message(http, base, chat, message)
        start, first, seen = time.perf_counter(), None, 0
        while True:
            bot, now = poll_bot_messages(http, base, chat)
            seen += len(bot)
            if seen and first is None:
                first = now
            if first is not None and now - first > settle:
                return seen
            if now - start > REPLY_TIMEOUT:
                raise TimeoutError(f"no bot reply to {message!r} within {REPLY_TIMEOUT} s")
            time.sleep(0.02)


def phase_e2e(base: str, concurrency: int, messages: int, poll_interval: float, think: float,
              message: str, expected: int, wait: int = 0, post_wait: int = 0) -> tuple[Stats, Stats, dict]:
    replies: dict[str, int] = {}
    lock = threading.Lock()

    def loop(http, chat, res):
        if think:
            time.sleep(random.uniform(0, think))  # not timed; de-synchronizes clients from the worker
        wall0, t0 = time.time(), time.perf_counter()
        key = post_message(http, base, chat, message, post_wait)
        now = time.perf_counter()
        if not post_wait:  # a POST that waits for the reply has no acknowledgement time of its own
            res.add("ack", now - t0)
        # Each message's replies are awaited before the next, so none can be left over: bot lines in the
        # POST's answer are this message's reply (the POST waited for it).
        bot, seen = chat["early"], 0
        while True:
            if bot:
                if not seen:
                    res.add("e2e", now - t0)  # the (first) reply is visible
                    res.add("timeline", (key, wall0, wall0 + (now - t0)))
                seen += len(bot)
                with lock:
                    for m in bot:
                        replies[m["text"][:60]] = replies.get(m["text"][:60], 0) + 1
                if seen >= expected:
                    return
            if now - t0 > REPLY_TIMEOUT:
                raise TimeoutError(f"{seen} of {expected} bot replies within {REPLY_TIMEOUT} s")
            before = chat["after"]
            bot, now = poll_bot_messages(http, base, chat, wait)
            res.add("polls", 1)
            if not bot and (not wait or chat["after"] == before):  # a plain poll, or a wait that ran out
                time.sleep(poll_interval)

    results, seconds = run_clients(concurrency, messages, lambda http, i: new_chat(http, base), loop)
    report_notes("(c)", results)
    e2e = collect(results, "e2e", "(c) inbox-to-reply end-to-end", seconds)
    ack = collect(results, "ack", "(b*) real POST ack, during (c)", seconds)
    ack.per_s = e2e.per_s  # the loop's rate is the e2e rate; shown for completeness
    polls = sum(len(r.samples.get("polls", [])) for r in results)
    timeline = [t for r in results for t in r.samples.get("timeline", [])]
    return e2e, ack, {"replies": replies, "polls": polls, "timeline": timeline}


def report_notes(phase: str, results: list[ClientResult]) -> None:
    notes = [n for r in results for n in r.notes]
    if notes:
        print(f"  {phase}: {len(notes)} problem(s), first: {notes[:3]}", file=sys.stderr)


class Backlog:
    """Looks at the queues directly (not through the app) to see when the worker is done."""

    def __init__(self, url: str):
        from recovery.models import InboxEvent, OutboxMessage

        self.engine = create_engine(url)
        self.InboxEvent, self.OutboxMessage = InboxEvent, OutboxMessage

    def retire_bench_events(self) -> int:
        """The store-only events have no handler; mark them processed so the worker leaves them alone."""
        E = self.InboxEvent
        with self.engine.begin() as conn:
            return conn.execute(update(E).where(E.source == "bench", E.processed_at.is_(None))
                                .values(processed_at=func.now())).rowcount

    def pending(self) -> tuple[int, int]:
        E, O = self.InboxEvent, self.OutboxMessage
        with self.engine.connect() as conn:
            inbox = conn.scalar(select(func.count()).select_from(E).where(E.processed_at.is_(None)))
            outbox = conn.scalar(select(func.count()).select_from(O).where(O.status == "pending"))
        return inbox, outbox

    def breakdown(self, timeline: list[tuple[str, float, float]]) -> dict | None:
        """Where the time of each (c) message went, from the rows' own timestamps (same machine clock):
        POST sent -> stored (inbox received_at) -> picked up by the worker (its reply's created_at, the
        turn's clock, taken when the dialog starts) -> turn done (processed_at, just before the commit)
        -> seen by the client (the commit, then the waiting poll's wake-up, or up to one poll interval). The reply is written in
        the turn's own transaction, keyed f"{conversation}:{event id}:{n}". Returns mean and p50 ms per
        segment, or None when no rows match."""
        from recovery.models import ChatMessage

        E, C = self.InboxEvent, ChatMessage
        client = {key: (sent, seen) for key, sent, seen in timeline}
        with self.engine.connect() as conn:
            events = conn.execute(
                select(E.id, E.delivery_key, E.conversation_key, E.received_at, E.processed_at)
                .where(E.source == "webchat", E.processed_at.is_not(None))).all()
            shown = {row.source_key: row.created_at for row in
                     conn.execute(select(C.source_key, C.created_at).where(C.source_key.is_not(None)))}
        segments: dict[str, list[float]] = {k: [] for k in SEGMENTS}
        for ev in events:
            key = f"{ev.conversation_key}:{ev.id}:0"
            if ev.delivery_key not in client or key not in shown:
                continue
            sent, seen = client[ev.delivery_key]
            points = [sent, ev.received_at.timestamp(), shown[key].timestamp(), ev.processed_at.timestamp(), seen]
            for name, a, b in zip(SEGMENTS, points, points[1:]):
                segments[name].append(b - a)
        n = len(segments[SEGMENTS[0]])
        if not n:
            return None
        return {"matched": n, **{name: {"mean_ms": sum(v) / n * 1e3, "p50_ms": percentile(sorted(v), 50) * 1e3}
                                 for name, v in segments.items()}}

    def backend_pids(self) -> list[int]:
        """PostgreSQL: the OS pids of the backends serving the scratch database (for CPU accounting)."""
        if self.engine.dialect.name != "postgresql":
            return []
        with self.engine.connect() as conn:
            return list(conn.scalars(text("SELECT pid FROM pg_stat_activity "
                                          "WHERE datname = current_database()")))

    def failures(self) -> tuple[int, int]:
        E, O = self.InboxEvent, self.OutboxMessage
        with self.engine.connect() as conn:
            failed = conn.scalar(select(func.count()).select_from(E).where(E.attempts > 0))
            dead = conn.scalar(select(func.count()).select_from(O).where(O.status == "dead"))
        return failed, dead

    def wait_empty(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.pending() == (0, 0):
                return time.perf_counter() - start
            time.sleep(0.02)
        raise TimeoutError(f"the worker did not drain the backlog within {timeout} s: {self.pending()}")

    def close(self) -> None:
        self.engine.dispose()


def warm_up(base: str, message: str) -> None:
    """A few requests of each kind so first-request costs (imports, template compilation, pools) are
    not in the figures."""
    with requests.Session() as http:
        chat = new_chat(http, base)
        for _ in range(10):
            http.post(f"{base}/bench/store", json={"text": message, "conversation": "warmup"},
                      timeout=REQUEST_TIMEOUT).raise_for_status()
            post_message(http, base, chat, message)
            http.get(f"{base}/chat/api/sessions/{chat['id']}/messages", params={"after": 0},
                     timeout=REQUEST_TIMEOUT).raise_for_status()


def noise_note(*busy_fractions: float) -> str | None:
    """A line for the report when other processes kept the machine busy before a measurement
    (`machine_busy` samples), since the figures then include that load; None when the machine was quiet."""
    noise = max(busy_fractions) * (os.cpu_count() or 1)
    if noise <= 0.25:
        return None
    return (f"NOTE: before a measurement, other processes kept {noise:.2f} cores busy (a shared machine); "
            "the figures include that noise.")


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over a short sample, before the benchmark adds any load."""
    before = _machine_busy_seconds()
    time.sleep(seconds)
    return (_machine_busy_seconds() - before) / seconds / (os.cpu_count() or 1)


def bench_db(kind: str, args) -> dict:
    print(f"== {kind}: preparing a fresh database", file=sys.stderr)
    busy_before = machine_busy()
    with tempfile.TemporaryDirectory(prefix="rb-bench-") as workdir, \
            scratch_database(kind, workdir, args.pg_admin_url) as url:
        version = db_version(kind, url)
        server = Server(url, workdir, args.idle_sleep, args.worker_mode)
        backlog = Backlog(url)
        cpu = {}
        try:
            warm_up(server.url, args.text)
            print(f"   (a) baseline store-only, {args.messages} POSTs", file=sys.stderr)
            with CpuMeter(server.pids, backlog.backend_pids) as cpu["a"]:
                store = phase_store(server.url, args.concurrency, args.messages, args.text)
            print(f"   (b) real POST ack, {args.messages} POSTs", file=sys.stderr)
            with CpuMeter(server.pids, backlog.backend_pids) as cpu["b"]:
                post = phase_post(server.url, args.concurrency, args.messages, args.text)
            backlog.retire_bench_events()
            queued = backlog.pending()[0]
            print(f"   drain: worker started on a backlog of {queued} events", file=sys.stderr)
            with CpuMeter(server.pids, backlog.backend_pids) as cpu["drain"]:
                server.start_worker()
                drain_s = backlog.wait_empty(timeout=PHASE_TIMEOUT)
            expected = probe_replies(server.url, args.text)
            print(f"   (c) end-to-end, {args.messages} messages ({expected} bot message(s) "
                  f"per {args.text!r})", file=sys.stderr)
            with CpuMeter(server.pids, backlog.backend_pids) as cpu["c"]:
                e2e, ack_in_e2e, extra = phase_e2e(server.url, args.concurrency, args.messages,
                                                   args.poll_interval, args.think, args.text, expected,
                                                   args.wait, args.post_wait)
            failed, dead = backlog.failures()
            breakdown = backlog.breakdown(extra["timeline"])
        finally:
            backlog.close()
            server.stop()
    return {"db": kind, "version": version, "idle_sleep": server.idle_sleep,
            "rows": [store, post, *([ack_in_e2e] if ack_in_e2e.count else []), e2e],
            "drain": {"events": queued, "seconds": drain_s, "per_s": queued / drain_s if drain_s else 0.0},
            "polls": extra["polls"], "replies": extra["replies"], "replies_per_message": expected,
            "failed_events": failed, "dead_messages": dead, "breakdown": breakdown,
            "cpu_cores": {phase: meter.cores for phase, meter in cpu.items()},
            "busy_before": busy_before}


# ---- report -------------------------------------------------------------------------------------------

def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}" if base else "-"


def render(results: list[dict], args) -> str:
    lines = ["| db | measurement | n | err | events/s | p50 ms | p99 ms | thr ÷ (a) | p50 ÷ (a) "
             "| p99 ÷ (a) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        base = res["rows"][0]
        for row in res["rows"]:
            per_s = f"{row.per_s:.0f}" + (" (=c)" if row.label.startswith("(b*)") else "")
            lines.append(f"| {res['db']} | {row.label} | {row.count} | {row.errors} | {per_s} | "
                         f"{row.p50_ms:.1f} | {row.p99_ms:.1f} | {ratio(row.per_s, base.per_s)} | "
                         f"{ratio(row.p50_ms, base.p50_ms)} | {ratio(row.p99_ms, base.p99_ms)} |")
    notes = []
    for res in results:
        d = res["drain"]
        e2e = res["rows"][-1]
        notes.append(f"- {res['db']} ({res['version']}): worker drained a backlog of {d['events']} events "
                     f"in {d['seconds']:.2f} s = {d['per_s']:.0f} events/s (message -> reply, no idle sleep); "
                     f"worker idle_sleep {res['idle_sleep']} s; {res['polls']} polls for {e2e.count} replies "
                     f"({res['polls'] / max(1, e2e.count):.1f} per reply); failed inbox events "
                     f"{res['failed_events']}, dead outbox messages {res['dead_messages']}.")
        b = res["breakdown"]
        if b:
            total = sum(b[name]["mean_ms"] for name in SEGMENTS)
            parts = "; ".join(f"{name} {b[name]['mean_ms']:.0f} ({b[name]['p50_ms']:.0f})" for name in SEGMENTS)
            notes.append(f"  (c) where the time goes, mean (p50) ms over {b['matched']} messages, "
                         f"total {total:.0f}: {parts}")
        notes.append(f"  CPU cores busy (of {os.cpu_count()}): " + "; ".join(
            f"{phase}: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            for phase, cores in res["cpu_cores"].items()))
        noise = max([res["busy_before"] * (os.cpu_count() or 1)]
                    + [cores["others"] for cores in res["cpu_cores"].values()])
        if noise > 0.25:
            notes.append(f"  NOTE: other processes kept up to {noise:.2f} cores busy during this run (a shared "
                         "machine); these figures include that noise.")
        if res["replies_per_message"] != 1:
            notes.append(f"  NOTE: {res['replies_per_message']} bot messages per customer message; (c) is the "
                         "time to the first; each client waited for all before its next message.")
        if len(res["replies"]) > res["replies_per_message"]:
            notes.append(f"  WARNING: more kinds of bot reply than expected: {res['replies']}")
    worker = "thread in one process" if args.worker_mode == "thread" else "in a process of its own"
    think = f", think time 0-{args.think * 1e3:.0f} ms" if args.think else ""
    header = (f"Web chat inbox-to-reply benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"werkzeug threaded server + worker {worker}; {args.concurrency} client threads (requests) in "
              f"another; {args.messages} messages per phase; " +
              (f"each message's POST waits up to {args.post_wait} s for the reply (as the chat page does), "
               "then " if args.post_wait else "") +
              (f"polls wait up to {args.wait} s for the reply" if args.wait else
               f"poll every {args.poll_interval * 1e3:.0f} ms") + f"{think}.")
    return "\n".join([header, "", *lines, "", *notes])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--messages", type=int, default=None,
                   help="messages per phase (default 800; --quick 200)")
    p.add_argument("--concurrency", type=int, default=None, help="client threads (default 8; --quick 4)")
    p.add_argument("--quick", action="store_true", help="a short run (a few seconds per database)")
    p.add_argument("--wait", type=int, default=10,
                   help="(c): each poll asks the server to wait up to this many seconds for the reply, as "
                        "the chat page does after a message (default 10); 0: plain polls every "
                        "--poll-interval")
    p.add_argument("--post-wait", type=int, default=10,
                   help="(c): each message's POST asks the server to hold its answer until the reply is "
                        "written, up to this many seconds, as the chat page does (default 10); 0: the POST "
                        "answers at once and polls wait for the reply (then (b*) is its ack time)")
    p.add_argument("--poll-interval", type=float, default=0.01,
                   help="client wait between empty polls, seconds (default 0.01; the web page's regular "
                        "poll is every 1 s)")
    p.add_argument("--text", default=QUESTION,
                   help=f"the customer message (default {QUESTION!r}: one reply)")
    p.add_argument("--think", type=float, default=0.0,
                   help="(c) only: random 0..THINK seconds before each message (default 0: closed loop)")
    p.add_argument("--worker-mode", choices=["thread", "process"], default="thread",
                   help="worker in a thread of the server process (like `recoverybot serve`, default) or in "
                        "its own process (like `recoverybot worker` beside the web server)")
    p.add_argument("--idle-sleep", type=float, default=None,
                   help="override the worker's idle_sleep, seconds (default: the product's own value)")
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL,
                   help="PostgreSQL URL used to create and drop the scratch database "
                        "(env BENCH_PG_ADMIN_URL)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.messages = args.messages or (200 if args.quick else 800)
    args.concurrency = args.concurrency or (4 if args.quick else 8)
    if args.messages < 1 or args.concurrency < 1:
        p.error("--messages and --concurrency must be at least 1")

    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    started = time.perf_counter()
    results = [bench_db(kind, args) for kind in kinds]
    print(render(results, args))
    print(f"\n(total run time {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(),
                       "results": [r | {"rows": [asdict(x) for x in r["rows"]]} for r in results]},
                      f, indent=2)
    failed = any(row.errors for r in results for row in r["rows"]) or \
        any(r["failed_events"] or r["dead_messages"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
