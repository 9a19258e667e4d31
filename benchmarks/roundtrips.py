#!/usr/bin/env python
"""SQL statements and commits per message, counted on the real app and worker, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/roundtrips.py [--db sqlite|postgres|both] [--repeat 5] [--pg-admin-url URL]
                                              [--json FILE]

Every statement the driver runs is counted with SQLAlchemy's `before_cursor_execute` event on the app's
engine, and every commit with its `commit` event. SQLite's `BEGIN IMMEDIATE` (which this app issues
itself) is left out of the statement count, since PostgreSQL's BEGIN never reaches the cursor; commits
count the transactions. Requests go through the Flask app (`bot.web.create_app`, in process); the worker's
part is one pass of `bot.worker.Worker` minus its housekeeping (inbox events, due timers, outbox).

Paths, each repeated `--repeat` times on fresh conversations or cases and reported as the mean:
  baseline          the bare store-only round trip: `recovery.inbox.store` (one transaction)
  web-chat FAQ      POST a message ("what is 2fa?") as the page does, the worker's turn, the read the
                    waiting POST makes once the reply is written
  web-chat start    "I lost my authenticator", then the address (opens a case, writes two emails)
  intercom message  signed webhook, the worker's turn (contact lookup first) and the reply's delivery
  slack click       an Approve click: the ack, the case re-read and the modal
  slack decision    the modal's submission (stored, acked with "deciding…"), then the worker's pass: the
                    decision, the approver told, the card updated
See docs/performance.md ("Round trips per message").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, event, text  # noqa: E402

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "bench-secret-key-0123456789-abcdefghijklmnop"
CHANNEL, APPROVER = "C0APPROVE", "UALICE"


class Counts:
    """Statements (by verb) and commits on one engine, between `start()` and `take()`."""

    def __init__(self, engine):
        self.verbs: Counter = Counter()
        self.commits = 0
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    trace = False

    def _statement(self, conn, cursor, statement, parameters, context, executemany):
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb != "BEGIN":
            self.verbs[verb] += 1
            if self.trace:
                print("    SQL", " ".join(statement.split())[:160])

    def _commit(self, conn):
        self.commits += 1
        if self.trace:
            print("    COMMIT")

    def start(self) -> None:
        self.verbs.clear()
        self.commits = 0

    def take(self) -> dict:
        out = {"statements": sum(self.verbs.values()), "commits": self.commits, "verbs": dict(self.verbs)}
        self.start()
        return out


def worker_pass(c, counts: "Counts | None" = None, into: dict | None = None, prefix: str = "") -> None:
    """One worker pass as `Worker.run_once` makes it, without the heartbeat and pruning (per pass, not
    per message): every waiting inbox event, every due timer, then the outbox. With `counts`, the pass
    is split into its turns ("worker: turn"), the deliveries of what they wrote ("worker: outbox") and
    the queries that found a queue empty ("worker: idle checks"), added to `into`."""
    from recovery import inbox

    def part(name: str) -> None:
        if counts is not None:
            got = counts.take()
            key = f"{prefix}worker: {name}"
            into[key] = add(into[key], got) if key in into else got

    while True:
        more = inbox.process_one(c.db, c.worker.handler, c.clock.now)
        part("turn" if more else "idle checks")
        if not more:
            break
    while True:
        more = c.recovery.fire_due_timer()
        part("timers" if more else "idle checks")
        if not more:
            break
    sent = c.worker.dispatcher.run_once(50, None)
    part("outbox" if sent else "idle checks")
    if sent:
        c.worker.dispatcher.run_once(50, None)
        part("idle checks")


def mean(rows: list[dict]) -> dict:
    verbs: Counter = Counter()
    for r in rows:
        verbs.update(r["verbs"])
    n = len(rows)
    return {"statements": sum(r["statements"] for r in rows) / n, "commits": sum(r["commits"] for r in rows) / n,
            "verbs": {k: v / n for k, v in sorted(verbs.items())}}


def add(a: dict, b: dict) -> dict:
    verbs = Counter(a["verbs"])
    verbs.update(b["verbs"])
    return {"statements": a["statements"] + b["statements"], "commits": a["commits"] + b["commits"],
            "verbs": dict(verbs)}


# ---- the paths -----------------------------------------------------------------------------------------

def baseline(c, counts: Counts, repeat: int) -> dict:
    from recovery import inbox

    rows = []
    for _ in range(repeat):
        counts.start()
        key = uuid.uuid4().hex
        inbox.store(c.db, source="bench", delivery_key=key, conversation_key=f"bench:{key}", now=c.clock.now(),
                    payload={"text": "hello"})
        rows.append(counts.take())
    with c.db.transaction() as s:  # the worker must not meet these
        s.execute(text("DELETE FROM inbox_events WHERE source = 'bench'"))
    return {"store": mean(rows)}


def webchat(c, client, counts: Counts, texts: list[str], repeat: int) -> dict:
    """Each text in turn in a fresh chat session; counts per step, averaged over `repeat` sessions."""
    steps: dict[str, list] = {}
    for _ in range(repeat):
        sid = client.post("/chat/api/sessions", json={"locale": "en"}).get_json()["session_id"]
        seq = 0
        for i, said in enumerate(texts):
            counts.start()
            # As the page posts: with "after" (the lines past it are read under the session's lock). Its
            # "wait" cannot be shown in one thread; the read it makes once the reply is written is the
            # "reply read" below, made here with a GET.
            r = client.post(f"/chat/api/sessions/{sid}/messages", json={"text": said, "after": seq})
            assert r.status_code == 202, r.get_data(as_text=True)
            steps.setdefault(f"{i}:web: store", []).append(counts.take())
            turn: dict = {}
            worker_pass(c, counts, turn, f"{i}:")
            for k, v in turn.items():
                steps.setdefault(k, []).append(v)
            got = client.get(f"/chat/api/sessions/{sid}/messages?after={seq}").get_json()["messages"]
            steps.setdefault(f"{i}:web: reply read", []).append(counts.take())
            assert any(m["sender"] == "bot" for m in got), f"no reply to {said!r}"
            seq = got[-1]["seq"]
    return {k: mean(v) for k, v in steps.items()}


def intercom(c, client, counts: Counts, api, repeat: int) -> dict:
    from tests.intercom_api import customer_event, signed_headers

    api.add_contact("contact-bench", role="user")
    steps: dict[str, list] = {}
    for _ in range(repeat):
        conv = uuid.uuid4().hex[:12]
        body = json.dumps(customer_event("what is 2fa?", conversation=conv, part=uuid.uuid4().hex[:8],
                                         contact="contact-bench", first=True)).encode()
        before = len(api.replies(conv))
        counts.start()
        r = client.post("/webhooks/intercom", data=body, headers=signed_headers(body))
        assert r.status_code in (200, 202), r.get_data(as_text=True)
        steps.setdefault("web: webhook", []).append(counts.take())
        turn: dict = {}
        worker_pass(c, counts, turn)
        for k, v in turn.items():
            steps.setdefault(k, []).append(v)
        assert len(api.replies(conv)) > before, "no Intercom reply"
    return {k: mean(v) for k, v in steps.items()}


def slack(c, client, counts: Counts, fake, repeat: int) -> dict:
    from benchmarks.slack_ack import awaiting_cases, cards
    from tests.slack_api import button_click, signed, submission

    ids = awaiting_cases(c, repeat, f"rt{uuid.uuid4().hex[:4]}")
    card_of = cards(c, ids)
    worker_pass(c)
    steps: dict[str, list] = {}
    for case_id in ids:
        channel, ts = card_of[case_id]
        before = len(fake.named("views.open"))
        body = button_click("approve_case", case_id=case_id, channel=channel, message_ts=ts, user=APPROVER,
                            trigger=f"trig-{uuid.uuid4().hex[:8]}")
        counts.start()
        assert client.post("/slack/events", data=body, headers=signed(body)).status_code == 200
        view = fake.wait_for("views.open", before + 1)[-1]["view"]  # the listener's last step
        steps.setdefault("click: web", []).append(counts.take())
        body = submission(view, user=APPROVER)
        r = client.post("/slack/events", data=body, headers=signed(body))
        assert r.status_code == 200 and r.get_json()["response_action"] == "update", r.get_data(as_text=True)
        steps.setdefault("decision: web", []).append(counts.take())
        turn: dict = {}
        worker_pass(c, counts, turn, "decision ")
        for k, v in turn.items():
            steps.setdefault(k, []).append(v)
    return {k: mean(v) for k, v in steps.items()}


# ---- the run -------------------------------------------------------------------------------------------

def run_db(kind: str, url: str, repeat: int) -> dict:
    from bot.web import create_app
    from bot.wiring import build
    from recovery import audit, db as dbmod
    from recovery.config import load_settings
    from tests.helpers import account, load_accounts
    from tests.intercom_api import FakeIntercom, settings_for
    from tests.slack_api import SIGNING_SECRET, FakeSlack

    dbmod.upgrade(url)
    workdir = tempfile.mkdtemp(prefix="roundtrips-")
    fake, api = FakeSlack(), FakeIntercom()
    conf = dict(DATABASE_URL=url, SECRET_KEY=SECRET, LOG_LEVEL="WARNING", SLACK_BOT_TOKEN="xoxb-bench",
                SLACK_SIGNING_SECRET=SIGNING_SECRET, SLACK_APPROVAL_CHANNEL=CHANNEL, SLACK_APPROVER_IDS=APPROVER,
                SLACK_API_URL=fake.url, MAIL_OUTBOX_DIR=os.path.join(workdir, "mail"),
                PUBLIC_BASE_URL="http://127.0.0.1:9", **settings_for(api))
    c = build(load_settings(**conf))
    try:
        rec = account("acct-rt-web", "rt-web@example.com")
        rec.pop("password")
        load_accounts(c, [rec])
        client = create_app(c).test_client()
        counts = Counts(c.db.engine)
        worker_pass(c)
        with c.db.transaction() as s:  # the audit chain's head exists, as in any database in use
            audit.append(s, case_id=audit.NO_CASE, event="benchmark", from_state=None, to_state=None,
                         actor="system", channel="system", reason=None, at=c.clock.now())
        out = {"baseline": baseline(c, counts, repeat)}
        out["web-chat FAQ"] = webchat(c, client, counts, ["what is 2fa?"], repeat)
        out["web-chat start"] = webchat(c, client, counts, ["I lost my authenticator", "rt-web@example.com"], 1)
        out["intercom message"] = intercom(c, client, counts, api, repeat)
        out["slack"] = slack(c, client, counts, fake, repeat)
        return out
    finally:
        c.close()
        fake.close()
        api.close()


def render(kind: str, result: dict) -> str:
    base = result["baseline"]["store"]
    lines = [f"\n{kind}: statements and commits per step (mean), and x the bare store-only round trip "
             f"({base['statements']:.1f} statements, {base['commits']:.1f} commit)",
             f"{'path':<18} {'step':<22} {'stmts':>6} {'commits':>7} {'x stmts':>8}  by verb"]
    for path, steps in result.items():
        total = None
        for step, n in steps.items():
            total = n if total is None else add(total, n)
            verbs = " ".join(f"{k.lower()} {v:g}" for k, v in n["verbs"].items())
            lines.append(f"{path:<18} {step:<22} {n['statements']:>6.1f} {n['commits']:>7.1f} "
                         f"{n['statements'] / base['statements']:>8.1f}  {verbs}")
        if len(steps) > 1:
            lines.append(f"{path:<18} {'= whole message':<22} {total['statements']:>6.1f} {total['commits']:>7.1f} "
                         f"{total['statements'] / base['statements']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--trace", action="store_true", help="print every statement and commit as it runs")
    args = p.parse_args(argv)
    Counts.trace = args.trace
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = {}
    for kind in (("sqlite", "postgres") if args.db == "both" else (args.db,)):
        started = time.perf_counter()
        if kind == "sqlite":
            results[kind] = run_db(kind, f"sqlite:///{tempfile.mkdtemp(prefix='roundtrips-')}/bot.db", args.repeat)
        else:
            name = f"rb_bench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                results[kind] = run_db(kind, args.pg_admin_url.rsplit("/", 1)[0] + f"/{name}", args.repeat)
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
        print(render(kind, results[kind]), flush=True)
        print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
