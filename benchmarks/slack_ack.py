#!/usr/bin/env python
"""Benchmark of the Slack approval path: how fast a click is acknowledged, and how fast a decision is made.

    .venv/bin/python benchmarks/slack_ack.py [--clicks 50] [--rounds 6] [--api-latency 0.2]
                                             [--serve gunicorn|werkzeug] [--processes 2] [--threads 8]
                                             [--phases all|clicks|submissions] [--bare-acks-in-request] [--spread 1]
                                             [--worker during|after] [--pg-admin-url URL] [--json FILE]

Slack gives an app 3 seconds to acknowledge a click, and a modal can only be opened with the click's
trigger_id within those 3 seconds. This measures, on PostgreSQL, against two apps served the same way
(by default as `recoverybot web` serves: gunicorn with --processes gthread workers of --threads threads,
each process building its own app; --serve werkzeug: one threaded werkzeug process), with the same
signing secret and the same signed request bodies:

  bare  a slack-bolt App whose listeners only call ack(), behind the same Flask adapter; Bolt's defaults,
        or with --bare-acks-in-request acking in the request's thread as ours does;
  ours  the product: bot.wiring.build + bot.web.create_app, with Slack pointed at a local fake Slack Web
        API (tests/slack_api.py) in a process of its own, as real Slack is elsewhere.

Each app first gets full bursts until every gunicorn process has served some (imports, templates and
connections are paid on a process's first requests); these are not measured. In the click phases the
two apps take turns burst by burst.

Phases, each `rounds` bursts of `clicks` requests released together by a barrier:
  click ack        Approve clicks (block_actions) on the cards of `clicks` awaiting cases; latency is
                   request sent -> HTTP response (the ack). Ours acks first, then re-reads the case and
                   calls views.open; "click -> views.open" is when the fake Slack received that call
                   (it must come within the trigger_id's 3 s).
                   Run twice: the fake API answering at once, and after --api-latency seconds (real Slack
                   answers in about 0.1-0.3 s), since a slow API ties up the listener threads; then, with
                   the slow API, the clicks spread evenly over --spread seconds instead of all at once.
  submission       Approve-modal submissions (view_submission), each on its own low-risk case. Ours stores
                   the submission and answers with a "recording…" view; a worker process (as `recoverybot
                   worker`; --worker during: through the bursts, after: once they are over) decides (a
                   locked, audited state change) and tells the approver with an ephemeral message.
                   "submission -> approver told" is when the fake Slack received that message. Every case
                   is checked afterwards to hold exactly one approval.
See docs/performance.md ("Slack approvals") for figures and caveats.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402

from common import collector_paused  # noqa: E402 - benchmarks/ is on the path when run as a script
from tests.slack_api import SIGNING_SECRET, FakeSlack, button_click, signed, submission  # noqa: E402

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "bench-secret-key-0123456789-abcdefghijklmnop"
CHANNEL, APPROVER = "C0APPROVE", "UALICE"
SLACK_LIMIT = 3.0


class SlowSlack(FakeSlack):
    """The fake Slack Web API, answering after `latency` seconds like the real one over the internet."""

    latency = 0.0

    def answer(self, method: str, args: dict) -> dict:
        if self.latency:
            time.sleep(self.latency)
        return super().answer(method, args)


def fake_slack_main(conn) -> None:
    """Serve a SlowSlack in its own process, taking orders over `conn` until told to close."""
    fake = SlowSlack()
    conn.send(fake.url)
    while True:
        order, arg = conn.recv()
        if order == "latency":
            fake.latency = arg
            conn.send(None)
        elif order == "named":
            conn.send(fake.named(arg))
        else:
            fake.close()
            conn.send(None)
            return


class RemoteSlack:
    """The fake Slack in a process of its own, as the real one is on other machines: in this process its
    request threads would share the interpreter with the client threads whose clocks time the acks, and
    only our app calls it, so only our app's acks would be timed late for it."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=fake_slack_main, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            self.proc.kill()
            raise RuntimeError("the fake Slack did not start")
        self.url = self.conn.recv()
        self.lock = threading.Lock()

    def _ask(self, order: str, arg=None):
        with self.lock:
            self.conn.send((order, arg))
            return self.conn.recv()

    def set_latency(self, seconds: float) -> None:
        self._ask("latency", seconds)

    def named(self, method: str) -> list[dict]:
        return self._ask("named", method)

    def close(self) -> None:
        try:
            self._ask("close")
        finally:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(db_url: str, slack_url: str, workdir: str, port: int) -> dict:
    return dict(DATABASE_URL=db_url, SECRET_KEY=SECRET, LOG_LEVEL="WARNING", SLACK_BOT_TOKEN="xoxb-bench",
                SLACK_SIGNING_SECRET=SIGNING_SECRET, SLACK_APPROVAL_CHANNEL=CHANNEL, SLACK_APPROVER_IDS=APPROVER,
                SLACK_API_URL=slack_url, MAIL_OUTBOX_DIR=os.path.join(workdir, "mail"),
                PUBLIC_BASE_URL=f"http://127.0.0.1:{port}")


# ---- the two servers (child processes) ------------------------------------------------------------------

def bare_app(slack_url: str, in_request: bool = False):
    from flask import Flask, request
    from slack_bolt import App
    from slack_bolt.adapter.flask import SlackRequestHandler
    from slack_sdk import WebClient

    bolt = App(client=WebClient(token="xoxb-bench", base_url=slack_url), signing_secret=SIGNING_SECRET,
               token_verification_enabled=False, ssl_check_enabled=False, process_before_response=in_request)
    bolt.action("approve_case")(lambda ack: ack())
    bolt.view("approve_modal")(lambda ack: ack())
    flask = Flask("bare")
    handler = SlackRequestHandler(bolt)
    flask.add_url_rule("/slack/events", "slack_events", lambda: handler.handle(request), methods=["POST"])
    return flask


def ours_app(conf: dict):
    from bot.startup import freeze_heap
    from bot.web import create_app
    from bot.wiring import build
    from recovery.config import load_settings

    app = create_app(build(load_settings(**conf)))  # the web process; no worker, like `recoverybot web`
    freeze_heap()
    return app


def server_main(kind: str, conf: dict, port: int, ready, serve: dict) -> None:
    """Serve one app. `serve["mode"]` is "gunicorn" (as `recoverybot web` does: gthread workers, each
    process building its own app) or "werkzeug" (one threaded process, as `recoverybot serve`)."""
    logging.basicConfig(level=logging.WARNING, format=f"{kind} server: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    def factory():
        return bare_app(conf["SLACK_API_URL"], serve["bare_in_request"]) if kind == "bare" else ours_app(conf)

    if serve["mode"] == "werkzeug":
        from werkzeug.serving import make_server

        server = make_server("127.0.0.1", port, factory(), threaded=True)
        ready.set()
        server.serve_forever()
        return
    from gunicorn.app.base import BaseApplication

    class Served(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"127.0.0.1:{port}")
            self.cfg.set("workers", serve["processes"])
            self.cfg.set("threads", serve["threads"])
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("backlog", 2048)
            self.cfg.set("loglevel", "warning")
            self.cfg.set("when_ready", lambda _arbiter: ready.set())

        def load(self):
            return factory()

    Served().run()


def worker_main(conf: dict, ready, nice: int = 0) -> None:
    """`recoverybot worker`: decides stored submissions and sends what they queued."""
    if nice:
        os.nice(nice)
    logging.basicConfig(level=logging.WARNING, format="worker: %(levelname)s %(name)s: %(message)s")
    from bot.startup import freeze_heap
    from bot.wiring import build
    from recovery.config import load_settings

    c = build(load_settings(**conf))
    freeze_heap()
    ready.set()
    c.worker.run_forever()


class Worker:
    def __init__(self, conf: dict, nice: int = 0):
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.proc = ctx.Process(target=worker_main, args=(conf, ready, nice), daemon=False)
        self.proc.start()
        if not ready.wait(60):
            self.stop()
            raise RuntimeError("the worker did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=30)


class Server:
    def __init__(self, kind: str, conf: dict, port: int, serve: dict):
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.url = f"http://127.0.0.1:{port}/slack/events"
        self.proc = ctx.Process(target=server_main, args=(kind, conf, port, ready, serve), daemon=False)
        self.proc.start()
        if not ready.wait(60):
            self.stop()
            raise RuntimeError(f"the {kind} server did not start")

    def stop(self) -> None:
        self.proc.terminate()  # gunicorn's arbiter stops its workers on SIGTERM
        self.proc.join(timeout=30)


# ---- cases and cards, made through the product's own code ----------------------------------------------

def awaiting_cases(c, n: int, prefix: str) -> list[str]:
    """n low-risk cases awaiting approval, their cards posted to the fake Slack."""
    from tests.conftest import code_in
    from tests.helpers import account, folder_mails, load_accounts, open_case, pass_checks

    records = [account(f"acct-{prefix}-{i}", f"{prefix}{i}@example.com") for i in range(n)]
    for rec in records:
        rec.pop("password")  # no argon2 per account
    load_accounts(c, records)
    ids = [open_case(c, rec["email"]) for rec in records]
    codes = {m["X-Recovery-Case"]: code_in(m) for m in folder_mails(c, "verification_code")}
    for case_id in ids:
        pass_checks(c, case_id, codes[case_id])
    return ids


def cards(c, case_ids: list[str]) -> dict[str, tuple[str, str]]:
    from recovery.models import SlackCard

    with c.db.transaction() as s:
        return {row.case_id: (row.channel, row.message_ts)
                for row in s.scalars(select(SlackCard).where(SlackCard.case_id.in_(case_ids)))}


# ---- load ----------------------------------------------------------------------------------------------------

def burst(url: str, bodies: list[str], spread: float = 0.0) -> list[tuple[float, float, int]]:
    """POST all bodies at the same moment, each freshly signed; returns (sent, answered, status) per body."""
    barrier = threading.Barrier(len(bodies))
    offsets = [spread * k / len(bodies) for k in range(len(bodies))]
    random.Random(len(bodies)).shuffle(offsets)
    out: list = [None] * len(bodies)

    def one(i: int) -> None:
        headers = signed(bodies[i])
        barrier.wait()
        if spread:  # the i-th request of n goes i/n of the way into the spread, in a shuffled order
            time.sleep(offsets[i])
        sent = time.monotonic()
        try:
            status = requests.post(url, data=bodies[i], headers=headers, timeout=30).status_code
        except requests.RequestException:
            status = 0
        out[i] = (sent, time.monotonic(), status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    # the set-up leaves a large heap here: one full collection held 50 requests' times up by 0.3 to 1 s
    with collector_paused():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def row(name: str, app: str, seconds: list[float], errors: int = 0) -> dict:
    return {"phase": name, "app": app, "n": len(seconds), "errors": errors,
            "p50_ms": pct(seconds, 50) * 1000, "p99_ms": pct(seconds, 99) * 1000, "max_ms": max(seconds) * 1000,
            "over_3s": sum(s > SLACK_LIMIT for s in seconds)}


def click_phase(name: str, servers: dict, fake: RemoteSlack, card_of: dict, rounds: int, rows: list,
                spread: float = 0.0) -> None:
    """`rounds` bursts per app, the apps taking turns burst by burst, so that a change in what else the
    machine is doing falls on both."""
    acks = {app: [] for app in servers}
    worst = {app: [] for app in servers}  # each burst's slowest ack, to tell one bad burst from a trend
    opened, errors = [], {app: 0 for app in servers}
    for r in range(rounds):
        for app, server in servers.items():
            triggers = {case_id: f"trig-{app}-{r}-{uuid.uuid4().hex[:8]}" for case_id in card_of}
            bodies = [button_click("approve_case", case_id=case_id, channel=ch, message_ts=ts, user=APPROVER,
                                   trigger=triggers[case_id]) for case_id, (ch, ts) in card_of.items()]
            results = burst(server.url, bodies, spread)
            acks[app] += [done - sent for sent, done, _ in results]
            worst[app].append(round(max(done - sent for sent, done, _ in results) * 1000, 1))
            errors[app] += sum(status != 200 for _, _, status in results)
            if app == "ours":  # the modals opened before the next burst, so they do not overlap it
                sent_at = {triggers[case_id]: results[i][0] for i, case_id in enumerate(card_of)}
                deadline, seen = time.monotonic() + 10, {}
                while time.monotonic() < deadline:
                    seen = {v["trigger_id"]: v["_at"] for v in fake.named("views.open") if v["trigger_id"] in sent_at}
                    if len(seen) == len(sent_at):
                        break
                    time.sleep(0.05)
                errors[app] += len(sent_at) - len(seen)
                opened += [seen[t] - sent_at[t] for t in seen]
    for app in servers:
        rows.append(row(f"click ack, {name}", app, acks[app], errors[app]) | {"burst_max_ms": worst[app]})
    rows.append(row(f"click -> views.open, {name}", "ours", opened))


def told_at(fake: RemoteSlack, cases) -> dict:
    """When the approver was told about each of `cases`: the ephemeral message naming the case."""
    found = {}
    for message in fake.named("chat.postEphemeral"):
        case_id = message["text"].split("`")[1] if message["text"].count("`") >= 2 else None
        if case_id in cases:
            found.setdefault(case_id, message["_at"])
    return found


def submission_phase(servers: dict, view_of: dict, batches: list[list[str]], rows: list,
                     fake: RemoteSlack | None = None) -> None:
    for app, server in servers.items():
        took, shown, errors = [], [], 0
        for batch in batches:
            results = burst(server.url, [submission(view_of[case_id], user=APPROVER) for case_id in batch])
            took += [done - sent for sent, done, _ in results]
            errors += sum(status != 200 for _, _, status in results)
            if app == "ours" and fake is not None:
                sent_at = {case_id: results[i][0] for i, case_id in enumerate(batch)}
                deadline, seen = time.monotonic() + 30, {}
                while time.monotonic() < deadline:
                    seen = told_at(fake, sent_at)
                    if len(seen) == len(sent_at):
                        break
                    time.sleep(0.05)
                errors += len(sent_at) - len(seen)
                shown += [seen[case_id] - sent_at[case_id] for case_id in seen]
        rows.append(row("modal submission (ack)", app, took, errors))
        if shown:
            rows.append(row("submission -> approver told", app, shown))


def render(rows: list[dict]) -> str:
    bare = {r["phase"]: r for r in rows if r["app"] == "bare"}
    lines = [f"{'phase':<34} {'app':<5} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'x bare p50':>10} "
             f"{'x bare p99':>10} {'> 3 s':>6} {'errors':>6}"]
    for r in rows:
        base = bare.get(r["phase"])
        ratio = (lambda k: f"{r[k] / base[k]:.1f}" if base and base[k] else "-")
        lines.append(f"{r['phase']:<34} {r['app']:<5} {r['n']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                     f"{r['max_ms']:>8.1f} {ratio('p50_ms') if r['app'] != 'bare' else '1.0':>10} "
                     f"{ratio('p99_ms') if r['app'] != 'bare' else '1.0':>10} {r['over_3s']:>6} {r['errors']:>6}")
    return "\n".join(lines)


# ---- the run ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clicks", type=int, default=50, help="concurrent requests per burst (default 50)")
    p.add_argument("--rounds", type=int, default=6, help="bursts per phase and app (default 6)")
    p.add_argument("--api-latency", type=float, default=0.2,
                   help="seconds the slow fake Slack API takes to answer (default 0.2)")
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="creates and drops the scratch database")
    p.add_argument("--serve", choices=("gunicorn", "werkzeug"), default="gunicorn",
                   help="how both apps are served (default gunicorn, as `recoverybot web`)")
    p.add_argument("--processes", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")),
                   help="gunicorn worker processes for both apps (default WEB_CONCURRENCY or 2)")
    p.add_argument("--threads", type=int, default=8, help="gunicorn threads per process for both apps (default 8)")
    p.add_argument("--worker", choices=("during", "after"), default="during",
                   help="during: a worker process decides while the bursts come (as deployed on one machine); "
                        "after: it starts once they are over, so the submissions' acks share the machine with "
                        "nothing but the web processes, like the bare app's (default during)")
    p.add_argument("--worker-nice", type=int, default=0,
                   help="run the worker at this nice value (a lower scheduling priority than the web processes)")
    p.add_argument("--bare-acks-in-request", action="store_true",
                   help="serve the bare app with process_before_response, so that it acks in the request's "
                        "thread as ours does, instead of Bolt's default (a pool thread acks, and the request "
                        "polls for it every 10 ms)")
    p.add_argument("--spread", type=float, default=1.0,
                   help="also run the clicks (slow API) spread evenly over this many seconds instead of all at "
                        "once, so that one click's modal work overlaps later clicks' acks (default 1; 0: skip)")
    p.add_argument("--phases", choices=("all", "clicks", "submissions"), default="all",
                   help="run only the click phases or only the submission phase (default all)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    clicks, submissions = args.phases in ("all", "clicks"), args.phases in ("all", "submissions")
    serve = {"mode": args.serve, "processes": args.processes, "threads": args.threads,
             "bare_in_request": args.bare_acks_in_request}
    started = time.perf_counter()

    from bot.wiring import build
    from recovery import db as dbmod
    from recovery.config import load_settings
    from recovery.models import Approval

    name = f"rb_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = args.pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    fake = RemoteSlack()
    servers: dict = {}
    try:
        dbmod.upgrade(db_url)
        workdir = tempfile.mkdtemp(prefix="slack-bench-")
        ports = {"bare": free_port(), "ours": free_port()}
        conf = settings(db_url, fake.url, workdir, ports["ours"])
        c = build(load_settings(**conf))
        click_cases = awaiting_cases(c, args.clicks, "click")
        decide_cases = awaiting_cases(c, args.clicks * args.rounds, "decide") if submissions else []
        card_of = cards(c, click_cases)
        c.close()
        with create_engine(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text("VACUUM ANALYZE"))  # else autovacuum may take a core during the first phase
        print(f"{len(click_cases)} cases to click on, {len(decide_cases)} to decide; setup "
              f"{time.perf_counter() - started:.0f} s", flush=True)

        servers = {kind: Server(kind, conf, ports[kind], serve) for kind in ("bare", "ours")}
        warm = [button_click("approve_case", case_id=k, channel=ch, message_ts=ts, user=APPROVER)
                for k, (ch, ts) in card_of.items()]
        for server in servers.values():
            # every process's first requests pay for imports, auth.test, templates and connections.
            # gunicorn's processes boot after the arbiter is ready, and a burst need not reach all of
            # them, so a few full bursts, until all of one is answered.
            for _ in range(3 * args.processes):
                if all(status == 200 for _, _, status in burst(server.url, warm)):
                    break
                time.sleep(1)
            for _ in range(2):
                burst(server.url, warm)
        settle = time.monotonic() + 10
        seen = -1
        while time.monotonic() < settle and len(fake.named("views.open")) != seen:  # the warm-up's modals
            seen = len(fake.named("views.open"))
            time.sleep(0.2)

        rows: list[dict] = []
        if clicks:
            fake.set_latency(0.0)
            click_phase("API at once", servers, fake, card_of, args.rounds, rows)
            fake.set_latency(args.api_latency)
            click_phase(f"API {args.api_latency * 1000:.0f} ms", servers, fake, card_of, args.rounds, rows)
            if args.spread:
                click_phase(f"API {args.api_latency * 1000:.0f} ms, over {args.spread:g} s", servers, fake, card_of,
                            args.rounds, rows, spread=args.spread)
        fake.set_latency(0.0)
        if submissions:
            # the approve modal each case's click opened: what Slack sends back on submission
            view_of = {v["view"]["private_metadata"].split("|")[0]: v["view"] for v in fake.named("views.open")}
            for case_id in decide_cases:  # not clicked on yet: open their modals the same way
                if case_id not in view_of:
                    view_of[case_id] = {"callback_id": "approve_modal", "private_metadata": f"{case_id}|{CHANNEL}",
                                        "blocks": [], "title": {"type": "plain_text", "text": "Approve reset"}}
            batches = [decide_cases[i:i + args.clicks] for i in range(0, len(decide_cases), args.clicks)]
            # the bare app acks the same bodies; ours decides each case once, so it goes last on these cases
            submission_phase({"bare": servers["bare"]}, view_of, batches, rows)
            worker = Worker(conf, nice=args.worker_nice) if args.worker == "during" else None
            try:
                submission_phase({"ours": servers["ours"]}, view_of, batches, rows, fake if worker else None)
                if worker is None:  # the decisions waited in the inbox; now a worker decides them
                    worker = Worker(conf)
                    started_at = time.monotonic()
                    deadline = started_at + 120
                    while len(told_at(fake, decide_cases)) < len(decide_cases) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    took = time.monotonic() - started_at
                    print(f"worker started after the bursts: {len(told_at(fake, decide_cases))} approvers told in "
                          f"{took:.1f} s ({len(decide_cases) / took:.0f} per second)")
            finally:
                if worker is not None:
                    worker.stop()

        engine = create_engine(db_url)
        with engine.connect() as conn:
            decided = conn.execute(select(Approval.case_id, func.count()).where(Approval.case_id.in_(decide_cases))
                                   .group_by(Approval.case_id)).all()
        engine.dispose()
        one_each = len(decided) == len(decide_cases) and all(n == 1 for _, n in decided)

        served = (f"gunicorn, {args.processes} processes x {args.threads} threads (gthread)" if args.serve == "gunicorn"
                  else "werkzeug threaded server, one process")
        print(f"\nPostgreSQL, both apps served by {served}; {args.clicks} concurrent requests per burst, "
              f"{args.rounds} bursts per phase and app; "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}; Slack's limit is {SLACK_LIMIT:.0f} s\n")
        print(render(rows))
        if submissions:
            print(f"\nevery decided case holds exactly one approval: {one_each} ({len(decided)}/{len(decide_cases)})")
        print(f"(total run time {time.perf_counter() - started:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "one_each": one_each}, indent=2))
        # Slack's 3 s applies to the acks and to opening the modal, not to telling the approver
        failed = not one_each or any(r["errors"] or (r["over_3s"] and "told" not in r["phase"]) for r in rows)
        return 1 if failed else 0
    finally:
        for server in servers.values():
            server.stop()
        fake.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
