"""What an operator watches: metrics read from the database and counted in-process, readiness, the
structured logs, the report, and the page policy's refusal of templates it could not allow."""
from __future__ import annotations

import io
import json
import logging
import xml.etree.ElementTree as ET

import pytest
import requests
from jinja2 import DictLoader, Environment
from prometheus_client import generate_latest

from bot import csp, logs
from bot.health import readiness
from bot.metrics import DatabaseCollector
from recovery.clock import ManualClock
from recovery.errors import ApprovalRefused
from tests.conftest import ChatClient, code_in
from tests.helpers import awaiting_case, last_mail, load_demo, open_case


def _samples(collector) -> dict[tuple, float]:
    """{(sample name, sorted label pairs): value} of everything a collector yields."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}


def test_database_metrics_follow_the_audit_log(any_db_url, make_container):
    """Opens (real and decoy), decisions, refusals, time to decision and the queue come from the
    database, and a later read folds in only the records added since."""
    clock = ManualClock()
    c = make_container(any_db_url, clock=clock)
    load_demo(c)
    open_case(c, "nobody@example.net")
    case_id = awaiting_case(c, "alex@example.com")
    collector = DatabaseCollector(c.db, c.clock, ttl=0)
    before = _samples(collector)
    assert before[("recoverybot_cases", (("state", "awaiting_approval"),))] == 1
    assert before[("recoverybot_case_opens_total", (("decoy", "unknown_email"),))] == 1
    assert before[("recoverybot_case_opens_total", (("decoy", "none"),))] == 1

    clock.advance(minutes=42)
    with pytest.raises(ApprovalRefused):
        c.recovery.decide(case_id, approver="mallory", decision="approve", channel="cli")
    c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
    c.worker.drain()
    read_before = collector.tally.last_id
    after = _samples(collector)
    assert collector.tally.last_id > read_before
    assert after[("recoverybot_approval_refusals_total", (("reason", "not_authorized"),))] == 1
    assert after[("recoverybot_decisions_total", (("decision", "approve"),))] == 1
    assert after[("recoverybot_case_transitions_total",
                  (("event", "send_link"), ("from_state", "approved"), ("to_state", "link_sent")))] == 1
    decided = ("recoverybot_time_to_decision_seconds_bucket", (("decision", "approve"), ("le", "3600.0")))
    assert after[decided] == 1
    assert after[("recoverybot_time_to_decision_seconds_bucket", (("decision", "approve"), ("le", "1800.0")))] == 0
    assert after[("recoverybot_time_to_decision_seconds_sum", (("decision", "approve"),))] == 42 * 60
    assert after[("recoverybot_cases", (("state", "link_sent"),))] == 1
    assert after[("recoverybot_workers_alive", ())] == 1
    with c.db.transaction() as s:
        assert collector.tally.update(s) == 0  # nothing new: nothing read


def test_check_outcomes_and_wrong_codes_count_only_when_committed(sqlite_url, make_container):
    """A wrong emailed code and each check's result are counted once their transaction commits; a
    rolled-back one leaves no sample."""
    c = make_container(sqlite_url)
    load_demo(c)
    case_id = open_case(c, "alex@example.com")
    with pytest.raises(RuntimeError):
        with c.recovery.service() as svc:
            svc.submit_code(case_id, "000000")
            raise RuntimeError("rolled back")
    text = generate_latest(c.metrics.registry).decode()
    assert "email_code_wrong" not in text
    with c.recovery.service() as svc:
        assert svc.submit_code(case_id, "000000").status == "wrong"
    with c.recovery.service() as svc:
        assert svc.submit_code(case_id, code_in(last_mail(c, "verification_code", case_id))).status == "ok"
    text = generate_latest(c.metrics.registry).decode()
    assert 'recoverybot_verification_failures_total{reason="email_code_wrong"} 1.0' in text
    assert 'recoverybot_check_results_total{check="email_code",result="pass"} 1.0' in text
    assert 'recoverybot_check_results_total{check="verified_session",result="neutral"} 1.0' in text
    assert 'recoverybot_emails_total{result="sent",template="verification_code"} 1.0' in text


def test_readiness_names_what_is_missing(sqlite_url, make_container):
    """/readyz's checks say when the database is unreachable, when no worker has beaten recently and
    when the schema is behind."""
    from types import SimpleNamespace

    from recovery.clock import Clock
    from recovery.db import Database

    gone = Database("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    assert readiness(SimpleNamespace(db=gone, clock=Clock())) == (False, {"database": "unreachable (OperationalError)"})
    gone.dispose()
    clock = ManualClock()
    c = make_container(sqlite_url, clock=clock)
    assert readiness(c) == (False, {"database": "ok", "schema": "ok",
                                    "worker": "no worker has reported yet: start `recoverybot worker`"})
    c.worker.run_once()
    assert readiness(c) == (True, {"database": "ok", "schema": "ok", "worker": "ok"})
    clock.advance(minutes=3)
    assert readiness(c)[1]["worker"] == "no worker heartbeat for 180 s"
    with c.db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0003'")
    ready, checks = readiness(c)
    assert not ready and checks["schema"].startswith("at 0003, this code needs")


@pytest.fixture
def json_log():
    """Captures what the JSON log handler writes while the test runs."""
    root = logging.getLogger()
    level = root.level
    logs.configure(logging.INFO, "json")
    handler = next(h for h in root.handlers if getattr(h, "_recoverybot_handler", False))
    stream = io.StringIO()
    handler.setStream(stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_json_logs_bind_request_and_case_ids_and_skip_polls(sqlite_url, live, json_log):
    """With LOG_FORMAT=json every line is an object; access lines carry their request id, a case's lines
    carry its case id, and the chat page's polls are left out."""
    server = live(sqlite_url)
    load_demo(server.container)
    chat = ChatClient(server.url)
    chat.ask("I lost my authenticator")
    given = requests.post(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                          json={"text": "alex@example.com"}, headers={"X-Request-ID": "req-from-proxy-1"}, timeout=5)
    assert given.headers["X-Request-ID"] == "req-from-proxy-1"
    chat.reply()
    lines = json_log()
    posted = [ln for ln in lines if ln["logger"] == "werkzeug" and "req-from-proxy-1" == ln.get("request_id")]
    assert posted and "POST /chat/api/sessions/" in posted[0]["event"]
    assert not [ln for ln in lines if "GET /chat/api/sessions/" in ln["event"]], "polls are logged"
    moved = [ln for ln in lines if ln["event"].endswith("start_checks -> verifying (system)")]
    assert moved and moved[0]["case_id"] in moved[0]["event"] and moved[0]["level"] == "info"


def test_report_prints_the_funnel_and_draws_it(sqlite_url, make_container, tmp_path):
    """`recoverybot report --svg` counts the period's cases at each stage, says where the others stopped,
    gives decision percentiles, and writes an SVG chart with the same numbers."""
    from click.testing import CliRunner

    from bot.cli import main
    from tests.conftest import SECRET

    c = make_container(sqlite_url)
    load_demo(c)
    approved = awaiting_case(c, "alex@example.com")
    denied = awaiting_case(c, "mei@example.com")
    c.recovery.decide(approved, approver="alice", decision="approve", channel="cli")
    c.recovery.decide(denied, approver="bob", decision="deny", reason="story did not add up", channel="cli")
    open_case(c, "nobody@example.net")
    svg = tmp_path / "report.svg"
    env = {"DATABASE_URL": sqlite_url, "SECRET_KEY": SECRET, "SLACK_BOT_TOKEN": None, "INTERCOM_ACCESS_TOKEN": None}
    result = CliRunner().invoke(main, ["report", "--days", "7", "--svg", str(svg)], env=env)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "  opened          3  100.0%" in out and "  verified        2   66.7%" in out
    assert "  approved        1   33.3%" in out and "denied while awaiting approval" in out
    assert "(1 of the opened cases could never pass" in out
    assert "Time to decision (approvers asked -> decided): 2 cases" in out
    texts = [t.text for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert "Funnel" in texts and "3 (100%)" in texts and "1 (33%)" in texts
    bad = CliRunner().invoke(main, ["report", "--days", "0"], env=env)
    assert bad.exit_code == 2 and "--days" in bad.output


def test_policy_refuses_inline_blocks_it_could_not_hash():
    """An inline script holding template code, or an inline event handler, stops the app at start-up
    instead of being served under a policy that would block it (or one loosened to allow it)."""
    def env(page: str) -> Environment:
        return Environment(loader=DictLoader({"web/page.html": page}))

    scripts, styles = csp.inline_hashes(env("<style>p{}</style><script>go()</script>"))
    assert len(scripts) == 1 and len(styles) == 1 and scripts[0].startswith("'sha256-")
    with pytest.raises(csp.UnhashableTemplate, match="template code"):
        csp.policy(env("<script>var id = {{ case_id }};</script>"))
    with pytest.raises(csp.UnhashableTemplate, match="event handlers"):
        csp.policy(env('<button onclick="go()">go</button>'))
