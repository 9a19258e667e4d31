"""Retention (issue 11): `recoverybot purge` removes personal data past its retention and leaves open
cases and the audit chain alone; the worker purges daily; /metrics shows purge runs and overdue data;
`recoverybot export` answers an access request without naming a secret.

The purge scenario runs on the `http` account directory (a local twin of the exchange's backend), so the
bot's database holds no account table: every byte of the SQLite file, and every text and JSON column
of PostgreSQL, is searched, with no table left out.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

import pyotp
import pytest
import requests
from sqlalchemy import MetaData, create_engine, select, text

from recovery.clock import ManualClock
from recovery.models import AuditRecord, Case, CaseDocument, PurgeRun
from recovery.retention import KINDS
from tests.account_backend import AccountBackend
from tests.conftest import SECRET, ChatClient, code_in, link_in, text_part
from tests.helpers import folder_mails, get_case, last_mail, open_case
from tests.intercom_api import FakeIntercom, settings_for
from tests.test_cli import cli, ok, refused, rows  # noqa: F401 - the `cli` fixture
from tests.test_intercom import Customer
from tests.test_security import (ALEX, bot_turn, enroll_approver, load_demo, manual_clock, recover_in_chat,
                                 setup_over_http, token_of)

EMAIL = "harbour.keelung.7@example.org"          # the scenario's customer
OTHER = "still.waiting@example.org"              # whose case stays open
TRANSCRIPT = "Please hurry, my phone sank in Keelung harbour on Tuesday"
FACT_ANSWERS = ("first deposit was March 2021 from my Kaohsiung bank", "DOGE to my Ledger in Hsinchu")
NO_CASE_LINE = "Is 2FA needed for withdrawals at the Tainan branch?"
DENY_REASON = "ID photo shows Chen Mei-ling, not the account holder"
DOCUMENT = b"\x89PNG\r\n\x1a\n" + hashlib.sha256(b"id card").digest() * 64 + os.urandom(256)
DOCUMENT_NAME = "keelung-id-card.png"
ZERO_DAYS = {f"RETENTION_DAYS_{k}": "0" for k in ("TRANSCRIPTS", "DOCUMENTS", "EVENTS", "CASES")}


def exchange_account(id: str, email: str) -> dict:
    return {"id": id, "email": email, "locale": "en", "created_at": "2021-03-02T08:00:00Z", "totp_enabled": True,
            "facts": {"first_deposit_month": "2021-03", "last_withdrawal_currency": "DOGE"}, "events": []}


@pytest.fixture
def exchange():
    fake = AccountBackend()
    for record in (exchange_account("acct-7001", EMAIL), exchange_account("acct-7002", OTHER)):
        fake.add(record)
    yield fake
    fake.close()


@pytest.fixture
def intercom():
    fake = FakeIntercom()
    yield fake
    fake.close()


# ---- what the database holds ----------------------------------------------------------------------------

def needles() -> dict[str, bytes]:
    """What the scenario's customer left behind. The document is encrypted at rest, so its bytes are looked
    for in plain text and base64 (never stored so), and by its hash and its encrypted form, captured
    while it is held (see the test)."""
    found = {"email address": EMAIL.encode(), "transcript": TRANSCRIPT.encode(),
             "document hash": hashlib.sha256(DOCUMENT).hexdigest().encode(),
             "line of a conversation without a case": NO_CASE_LINE.encode(), "deny reason": DENY_REASON.encode(),
             "document name": DOCUMENT_NAME.encode(), "document bytes": DOCUMENT[8:72],
             "document bytes (base64)": base64.b64encode(DOCUMENT)[16:96]}
    found |= {f"facts answer {i}": answer.encode() for i, answer in enumerate(FACT_ANSWERS)}
    return found


def sqlite_bytes(db_url: str) -> bytes:
    """The whole SQLite database: the file and its write-ahead log."""
    path = Path(db_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def postgres_hits(db_url: str, found: dict[str, bytes]) -> dict[str, list[str]]:
    """For each needle, every text, JSON and bytea column of every table that contains it."""
    engine = create_engine(db_url)
    hits: dict[str, list[str]] = {}
    try:
        with engine.connect() as conn:
            columns = conn.execute(text(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public' AND data_type IN "
                "('text', 'character varying', 'json', 'jsonb', 'bytea')")).all()
            assert len(columns) > 40  # the search is real: it sees the whole schema
            names = list(found)
            for table, column, kind in columns:
                if kind == "bytea":
                    tests = [f'bool_or(position(:v{i} IN "{column}") > 0)' for i in range(len(names))]
                    values = {f"v{i}": found[n] for i, n in enumerate(names)}
                else:
                    tests = [f'bool_or(strpos("{column}"::text, :v{i}) > 0)' for i in range(len(names))]
                    values = {f"v{i}": found[n].decode("utf-8", "replace") for i, n in enumerate(names)}
                row = conn.execute(text(f'SELECT {", ".join(tests)} FROM "{table}"'), values).one()
                for name, hit in zip(names, row):
                    if hit:
                        hits.setdefault(name, []).append(f"{table}.{column}")
    finally:
        engine.dispose()
    return hits


def leaks(db_url: str, extra: dict[str, bytes]) -> dict[str, list[str] | bool]:
    found = needles() | extra
    if db_url.startswith("sqlite"):
        whole = sqlite_bytes(db_url)
        return {name: True for name, needle in found.items() if needle in whole}
    return postgres_hits(db_url, found)


def footprint(c, case_id: str, conversation: str) -> dict:
    """Every row of every table that belongs to the case or its conversation, found by reflection."""
    meta = MetaData()
    meta.reflect(bind=c.db.engine)
    out = {}
    with c.db.engine.connect() as conn:
        for table in meta.sorted_tables:
            keys = [(col, value) for col, value in (("case_id", case_id), ("conversation_key", conversation),
                                                    ("conversation_id", conversation), ("key", conversation))
                    if col in table.c]
            if table.name == "cases":
                keys = [("id", case_id)]
            if table.name == "audit_log":
                continue  # appended to, never changed; checked by `audit verify`
            for col, value in keys:
                rows = conn.execute(table.select().where(table.c[col] == value)).all()
                out[f"{table.name}.{col}"] = sorted(map(repr, rows))
    assert out["cases.id"] and out["case_documents.case_id"] and out["inbox_events.conversation_key"]
    return out


# ---- the purge ------------------------------------------------------------------------------------------

def purged(output: str) -> dict[str, int]:
    """The counts `purge` printed, by kind."""
    return {kind: int(n) for kind, n in re.findall(r"^  (\w+) +(\d+)", output, re.M)}


def test_purge_with_zero_retention_leaves_nothing_of_a_finished_case(any_db_url, live, exchange, intercom, cli):
    """After `purge` with every retention at 0 days, the finished case's email address, transcript, facts
    answers, deny reason and document are nowhere in the database, the audit chain still verifies, the run
    is audited, and a case still open is untouched."""
    intercom.add_contact("contact-1", role="lead")
    intercom.add_contact("contact-2", role="lead")
    server = live(any_db_url, worker=False, **exchange.settings(), **settings_for(intercom))
    c = server.container
    customer = Customer(server, intercom, "147000000901", contact="contact-1")

    def say(who: Customer, line: str, **extra) -> None:
        who.say(line, **extra)
        c.worker.drain()

    say(customer, "I lost my authenticator")
    say(customer, EMAIL)
    say(customer, code_in(last_mail(c, "verification_code")))
    for answer in FACT_ANSWERS:
        say(customer, answer)
    url = intercom.add_file(DOCUMENT_NAME, DOCUMENT)
    say(customer, "here is my ID card", attachments=[{"type": "upload", "name": DOCUMENT_NAME, "url": url,
                                                      "content_type": "image/png", "filesize": len(DOCUMENT)}])
    say(customer, TRANSCRIPT)
    with c.db.transaction() as s:
        case_id = s.scalar(select(Case.id).where(Case.account_id == "acct-7001"))
        doc = s.scalar(select(CaseDocument))
        assert doc.case_id == case_id and base64.b64decode(c.keyring.decrypt(doc.content_enc)) == DOCUMENT
    sealed_document = {"document, encrypted as stored": doc.content_enc[40:120].encode()}
    assert get_case(c, case_id).state == "awaiting_approval"
    c.recovery.decide(case_id, approver="alice", decision="deny", reason=DENY_REASON)
    c.worker.drain()
    assert get_case(c, case_id).state == "denied" and folder_mails(c, "denied", to=EMAIL)

    chat = ChatClient(server.url)  # a web chat without a case
    bot_turn(chat, c, NO_CASE_LINE)

    waiting = Customer(server, intercom, "147000000902", contact="contact-2")  # a case that stays open
    say(waiting, "I lost my authenticator")
    say(waiting, OTHER)
    url = intercom.add_file("passport.png", b"\x89PNG other customer")
    say(waiting, "my passport", attachments=[{"type": "upload", "name": "passport.png", "url": url,
                                              "content_type": "image/png", "filesize": 20}])
    with c.db.transaction() as s:
        open_id = s.scalar(select(Case.id).where(Case.account_id == "acct-7002"))
    open_before = footprint(c, open_id, "intercom:147000000902")

    # the search is real: before the purge it finds the plain-text copies
    before = leaks(any_db_url, sealed_document)
    assert {"email address", "transcript", "facts answer 0", "deny reason", "document name", "document hash",
            "document, encrypted as stored"} <= set(before)
    with c.db.transaction() as s:
        assert not any(DENY_REASON in (r or "") for r in s.scalars(select(AuditRecord.reason)))

    dry = ok(cli("purge", "--dry-run", db_url=any_db_url, **ZERO_DAYS))
    counts = purged(dry)
    assert dry.startswith("would purge") and re.search(r"transcripts +2 +conversations \(\d+ web chat lines\)", dry)
    assert (counts["transcripts"], counts["documents"], counts["cases"]) == (2, 1, 1) and counts["events"] >= 10
    assert leaks(any_db_url, sealed_document) == before
    assert footprint(c, open_id, "intercom:147000000902") == open_before

    done = ok(cli("purge", db_url=any_db_url, **ZERO_DAYS))
    assert done.replace("purged", "would purge", 1) == dry
    assert leaks(any_db_url, sealed_document) == {}, "still in the database after the purge"
    assert "audit log intact" in ok(cli("audit", "verify", db_url=any_db_url))
    assert footprint(c, open_id, "intercom:147000000902") == open_before

    with c.db.transaction() as s:
        (run,) = s.scalars(select(PurgeRun).where(PurgeRun.trigger == "cli")).all()
        (record,) = s.scalars(select(AuditRecord).where(AuditRecord.event == "purge",
                                                        AuditRecord.channel == "cli")).all()
        case = s.get(Case, case_id)
    assert (run.transcripts, run.documents, run.cases) == (2, 1, 1) and run.finished_at is not None
    assert record.reason.startswith(f"transcripts=2 documents=1 events={run.events} cases=1")
    assert (case.state, case.account_id, case.final_reason) == ("denied", None, None)
    assert case.details_purged_at is not None
    assert "purged" in ok(cli("cases", "show", case_id, db_url=any_db_url))
    assert purged(ok(cli("purge", db_url=any_db_url, **ZERO_DAYS))) == dict.fromkeys(KINDS, 0)


def test_purge_keeps_what_is_within_its_retention(sqlite_url, make_container, cli):
    """With the default retention a case closed a moment ago keeps everything, and the dry run says so."""
    c = make_container(sqlite_url)
    load_demo(c)
    case_id = open_case(c, ALEX)
    with c.recovery.service() as svc:
        svc.cancel(case_id, actor="customer", channel="webchat", reason="cancelled in chat")
    c.worker.drain()
    out = ok(cli("purge", "--dry-run", db_url=sqlite_url))
    assert "days kept: transcripts 90, documents 30, events 30, cases 365" in out
    assert purged(out) == dict.fromkeys(KINDS, 0)
    refused(cli("purge", db_url=sqlite_url, RETENTION_DAYS_CASES="-1"), "RETENTION_DAYS_CASES")
    assert get_case(c, case_id).account_id == "acct-1001"


def _metric(body: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", body, re.M).group(1))


def test_worker_purges_daily_and_metrics_show_it(sqlite_url, live):
    """The worker purges once a day (not on every pass), and /metrics shows the runs and how long the
    oldest data past its retention has waited."""
    clock = ManualClock()
    server = live(sqlite_url, worker=False, clock=clock, RETENTION_DAYS_CASES="1")
    c = server.container
    load_demo(c)
    case_id = open_case(c, ALEX)  # the first pass also runs the first daily purge: nothing is due
    with c.recovery.service() as svc:
        svc.cancel(case_id, actor="customer", channel="webchat", reason="cancelled in chat")
    c.worker.drain()

    def metrics() -> str:
        return requests.get(f"{server.url}/metrics", timeout=10).text

    assert _metric(metrics(), "recoverybot_purge_runs_total") == 1
    clock.advance(hours=12)
    c.worker.run_once()
    assert _metric(metrics(), "recoverybot_purge_runs_total") == 1, "purged again within a day"

    clock.advance(hours=18)  # the case's details are 6 hours past their day; the worker has not looked yet
    body = metrics()
    assert _metric(body, 'recoverybot_retention_overdue_seconds{kind="cases"}') == pytest.approx(6 * 3600)
    assert _metric(body, 'recoverybot_retention_oldest_age_seconds{kind="cases"}') == pytest.approx(30 * 3600)
    assert _metric(body, 'recoverybot_retention_overdue_seconds{kind="transcripts"}') == 0
    assert get_case(c, case_id).account_id == "acct-1001"

    c.worker.run_once()
    body = metrics()
    assert _metric(body, "recoverybot_purge_runs_total") == 2
    assert _metric(body, 'recoverybot_purged_total{kind="cases"}') == 1
    assert _metric(body, 'recoverybot_retention_overdue_seconds{kind="cases"}') == 0
    assert _metric(body, 'recoverybot_retention_oldest_age_seconds{kind="cases"}') == 0
    assert _metric(body, "recoverybot_purge_last_run_timestamp_seconds") == pytest.approx(clock.now().timestamp())
    assert get_case(c, case_id).account_id is None


# ---- the access request -------------------------------------------------------------------------------

def test_export_of_a_completed_case_holds_the_case_and_transcript_and_no_secret(any_db_url, live, cli):
    """`export --account` prints one JSON document with the completed case, its checks, decisions, emails
    (templates and times) and transcript, and none of the codes, tokens, TOTP secrets or recovery codes."""
    server = live(any_db_url, worker=False, clock=manual_clock(), RISK_POLICY='{"levels": {"low": {"step_up": true}}}')
    c = server.container
    load_demo(c, alex_password=True)
    approver = enroll_approver(c, "alice")
    case_id, email_code, _ = recover_in_chat(ChatClient(server.url), c)
    c.clock.advance(seconds=30)
    c.recovery.decide(case_id, approver="alice", decision="approve", step_up_code=approver.at(c.clock.now()))
    c.worker.drain()
    link = link_in(last_mail(c, "enroll_link", case_id), "enroll")
    browser, key = setup_over_http(link)
    done = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
    recovery_codes = re.findall(r"<li>([0-9a-f-]{23})</li>", done.text)
    c.worker.drain()
    assert get_case(c, case_id).state == "completed" and len(recovery_codes) == 8

    out = ok(cli("export", "--account", "acct-1001", db_url=any_db_url))
    doc = json.loads(out)
    (case,) = doc["cases"]
    assert doc["account_id"] == "acct-1001" and doc["account"]["email"] == ALEX
    assert (case["id"], case["state"], case["risk"]["level"]) == (case_id, "completed", "low")
    assert {c["name"]: c["result"] for c in case["checks"]}["email_code"] == "pass"
    assert [(d["approver"], d["decision"]) for d in case["decisions"]] == [("alice", "approve")]
    assert [h["event"] for h in case["history"]][-1] == "complete"
    templates = [e["template"] for e in case["emails"]]
    assert {"verification_code", "enroll_link", "completed"} <= set(templates)
    assert all(e["to"] == ALEX and e["sent_at"] for e in case["emails"])
    (conversation,) = case["conversations"]
    said = [line["text"] for line in conversation["lines"] if line["from"] == "customer"]
    assert said == ["I lost my authenticator", ALEX, "the code is ••••••", "May 2023", "usdt"]
    assert any(line["from"] == "bot" for line in conversation["lines"])

    mails = folder_mails(c, to=ALEX)
    secrets = {"email code": email_code, "enroll token": token_of(link), "totp secret": key,
               "approver totp secret": approver.secret, "password": "correct horse battery", "SECRET_KEY": SECRET}
    secrets |= {f"cancel token {i}": token_of(u) for i, m in enumerate(mails)
                for u in re.findall(r"https?://\S+/cancel/[A-Za-z0-9_\-]+", text_part(m))}
    secrets |= {f"recovery code {i}": code for i, code in enumerate(recovery_codes)}
    named = sorted(name for name, secret in secrets.items()
                   if re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", out))
    assert named == []
    assert "/enroll/" not in out and "/cancel/" not in out

    refused(cli("export", "--account", "acct-nobody", db_url=any_db_url), "no account 'acct-nobody'")


def test_upgrade_gives_existing_data_what_retention_counts_from(tmp_path):
    """Upgrading a database from before retention dates cases already final from their last change and
    ties queued messages to their case by the idempotency key, so they age like new ones."""
    from alembic import command

    from recovery import db as dbmod

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(dbmod.alembic_config(url), "0003")
    engine = create_engine(url)
    with engine.begin() as conn:
        for case_id, state in (("RC-AAAAAAAA", "denied"), ("RC-BBBBBBBB", "verifying")):
            conn.execute(text(
                "INSERT INTO cases (id, state, channel, conversation_id, opened_by, locale, risk_reasons, "
                "code_failures, code_sends, link_failures, version, created_at, updated_at) VALUES "
                "(:id, :state, 'webchat', 'webchat:x', 'customer', 'en', '[]', 0, 1, 0, 2, "
                "'2026-01-01 10:00:00.000000', '2026-01-02 11:30:00.000000')"), {"id": case_id, "state": state})
        for key in ("RC-AAAAAAAA:email-denied:0a1b", "webchat:x:17:0"):
            conn.execute(text(
                "INSERT INTO outbox (kind, idempotency_key, payload_enc, status, attempts, next_attempt_at, "
                "created_at) VALUES ('email', :key, 'x', 'sent', 1, '2026-01-02 11:30:00.000000', "
                "'2026-01-02 11:30:00.000000')"), {"key": key})
    engine.dispose()
    dbmod.upgrade(url)
    assert [tuple(r) for r in rows(url, "SELECT id, closed_at FROM cases ORDER BY id")] == [
        ("RC-AAAAAAAA", "2026-01-02 11:30:00.000000"), ("RC-BBBBBBBB", None)]
    assert [tuple(r) for r in rows(url, "SELECT idempotency_key, case_id FROM outbox ORDER BY id")] == [
        ("RC-AAAAAAAA:email-denied:0a1b", "RC-AAAAAAAA"), ("webchat:x:17:0", None)]

