"""The `recoverybot` command line (the commands the README lists), run through click's CliRunner against real
databases: schema, demo data, account imports, case commands, audit verification and configuration."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from bot.cli import main
from tests.conftest import SECRET
from tests.helpers import awaiting_case, last_mail, load_demo



# ---- running the CLI ---------------------------------------------------------------------------------

@pytest.fixture
def cli(tmp_path):
    """cli(*args, db_url=..., **env) -> click Result; the environment holds only what the test sets."""
    runner = CliRunner()

    def run(*args: str, db_url: str, **env):
        base = {
            "DATABASE_URL": db_url, "SECRET_KEY": SECRET, "MAIL_OUTBOX_DIR": str(tmp_path / "mail"),
            "PUBLIC_BASE_URL": "http://127.0.0.1:9", "LOG_LEVEL": "WARNING",
            # nothing from the surrounding environment may switch on a real channel or change policy
            "SMTP_URL": None, "RISK_POLICY": None, "SLACK_BOT_TOKEN": None, "SLACK_APP_TOKEN": None,
            "INTERCOM_ACCESS_TOKEN": None, "ACCOUNT_DIRECTORY": None, "TEMPLATES_DIR": None,
        }
        return runner.invoke(main, list(args), env=base | env, catch_exceptions=True)

    return run


def ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result.output


def refused(result, *phrases: str) -> str:
    """A failure the user can act on: exit != 0, no traceback, and a message naming the problem."""
    assert result.exit_code != 0, result.output
    # a clean error is a SystemExit from click, never an exception escaping the command
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, f"{phrase!r} not in {result.output!r}"
    return result.output


def rows(db_url: str, sql: str, **params) -> list:
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def count(db_url: str, table: str) -> int:
    return rows(db_url, f"SELECT COUNT(*) FROM {table}")[0][0]


# ---- a case driven through the domain ----------------------------------------------------------------

def case_awaiting_approval(c) -> str:
    """alex@example.com opens a case, types the emailed code and answers both facts right."""
    load_demo(c)
    return awaiting_case(c, "alex@example.com", conversation_key="webchat:cli-test")


# ---- schema and demo data ------------------------------------------------------------------------------

def test_db_upgrade_is_safe_to_run_twice(tmp_path, cli):
    """`db upgrade` creates the schema on a new SQLite file and, run again, changes nothing."""
    url = f"sqlite:///{tmp_path / 'fresh' / 'bot.db'}"
    first = ok(cli("db", "upgrade", db_url=url))
    second = ok(cli("db", "upgrade", db_url=url))
    revision = re.search(r"schema is at revision (\S+)", first).group(1)
    assert second.strip() == first.strip() and revision != "None"
    assert count(url, "cases") == 0 and count(url, "accounts") == 0


def test_commands_need_the_schema_first(tmp_path, cli):
    """Any command on a database without a schema says to run `db upgrade`."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    refused(cli("cases", "list", db_url=url), "no schema yet", "recoverybot db upgrade")


def test_demo_data_loads_and_reloads(sqlite_url, cli):
    """`demo-data` creates the three demo accounts, and running it again updates them."""
    assert "3 created, 0 updated" in ok(cli("demo-data", db_url=sqlite_url))
    assert "0 created, 3 updated" in ok(cli("demo-data", db_url=sqlite_url))
    emails = {r[0] for r in rows(sqlite_url, "SELECT email FROM accounts")}
    assert emails == {"alex@example.com", "mei@example.com", "sam@example.com"}


# ---- accounts import -----------------------------------------------------------------------------------

def record(id: str, email: str, **extra) -> dict:
    return {"id": id, "email": email, "password": "pw " + id, "locale": "en",
            "created_at": "2023-05-02T08:00:00Z", "totp_enabled": True,
            "facts": {"first_deposit_month": "2023-05"},
            "events": [{"type": "password_changed", "at": "2026-11-20T10:00:00Z"}], **extra}


def write(tmp_path: Path, name: str, doc) -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def test_accounts_import_creates_then_updates(sqlite_url, cli, tmp_path):
    """A good file imports; importing again with one changed and one new account says 1 created, 1 updated."""
    first = write(tmp_path, "a.json", {"accounts": [record("acct-1", "mei@example.com", locale="zh-TW"),
                                                    record("acct-2", "lee@example.com")]})
    assert "imported 2 accounts (2 created, 0 updated)" in ok(cli("accounts", "import", str(first),
                                                                   db_url=sqlite_url))
    second = write(tmp_path, "b.json", {"accounts": [record("acct-2", "Lee.New@Example.com", balance_usd=5),
                                                     record("acct-3", "kim@example.com")]})
    assert "imported 2 accounts (1 created, 1 updated)" in ok(cli("accounts", "import", str(second),
                                                                   db_url=sqlite_url))
    stored = dict(rows(sqlite_url, "SELECT id, email FROM accounts"))
    assert stored == {"acct-1": "mei@example.com", "acct-2": "lee.new@example.com", "acct-3": "kim@example.com"}
    assert count(sqlite_url, "account_events") == 3


GOOD = record("acct-1", "ok@example.com")
BAD_FILES = {
    "unknown top-level key": ({"accounts": [GOOD], "users": []}, ["file: unknown keys: users"]),
    "unknown account key": ({"accounts": [GOOD, record("acct-2", "b@example.com", nickname="b", pin=1)]},
                            ["accounts[1]: unknown keys: nickname, pin"]),
    "invalid JSON": ('{"accounts": [\n  {"id": "acct-1",}\n]}', ["not valid JSON", "line 2"]),
    "not an object": ("[1, 2]", ["file: must be a JSON object"]),
    "accounts not a list": ({"accounts": {"id": "acct-1"}}, ["accounts: must be a list"]),
    "bad email": ({"accounts": [GOOD, record("acct-2", "not-an-email")]}, ["accounts[1].email",
                                                                            "'not-an-email'"]),
    "bad time": ({"accounts": [GOOD, record("acct-2", "b@example.com", created_at="last tuesday")]},
                 ["accounts[1].created_at", "not an ISO 8601 time"]),
    "time without zone": ({"accounts": [GOOD, record("acct-2", "b@example.com",
                                                     created_at="2023-05-02T08:00:00")]},
                          ["accounts[1].created_at", "no time zone"]),
    "duplicate id": ({"accounts": [GOOD, record("acct-1", "b@example.com")]},
                     ["accounts[1].id", "duplicate id 'acct-1'"]),
    "duplicate email in other case": ({"accounts": [GOOD, record("acct-2", "OK@Example.com")]},
                                      ["accounts[1].email", "duplicate email"]),
    "bad event type": ({"accounts": [GOOD, record("acct-2", "b@example.com",
                                                  events=[{"type": "sim_swapped", "at": "2026-11-20T10:00:00Z"}])]},
                       ["accounts[1].events[0].type", "password_changed"]),
    "bad event time": ({"accounts": [GOOD, record("acct-2", "b@example.com",
                                                  events=[{"type": "withdrawal", "at": 1700000000}])]},
                       ["accounts[1].events[0].at"]),
    "bad locale": ({"accounts": [GOOD, record("acct-2", "b@example.com", locale="fr")]},
                   ["accounts[1].locale", "en, zh-TW"]),
    "missing id": ({"accounts": [GOOD, {"email": "b@example.com", "created_at": "2023-05-02T08:00:00Z"}]},
                   ["accounts[1]: missing 'id'"]),
    "negative balance": ({"accounts": [GOOD, record("acct-2", "b@example.com", balance_usd=-1)]},
                         ["accounts[1].balance_usd"]),
    "facts not strings": ({"accounts": [GOOD, record("acct-2", "b@example.com", facts={"x": 1})]},
                          ["accounts[1].facts"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_accounts_import_refuses_a_bad_file_whole(sqlite_url, cli, tmp_path, case):
    """A bad record fails the import with a message naming the record and field, and nothing is imported."""
    doc, phrases = BAD_FILES[case]
    path = write(tmp_path, "bad.json", doc)
    out = refused(cli("accounts", "import", str(path), db_url=sqlite_url), *phrases)
    assert str(path) in out and "nothing was imported" in out
    assert count(sqlite_url, "accounts") == 0 and count(sqlite_url, "account_events") == 0


def test_accounts_import_refuses_an_email_owned_by_another_account(sqlite_url, cli, tmp_path):
    """Importing a new id with an email another stored account already has is refused by name, not a crash."""
    ok(cli("demo-data", db_url=sqlite_url))
    path = write(tmp_path, "steal.json", {"accounts": [record("acct-new", "kim@example.com"),
                                                       record("acct-evil", "Alex@Example.com")]})
    refused(cli("accounts", "import", str(path), db_url=sqlite_url),
            "accounts[1].email", "acct-1001", "nothing was imported")
    assert count(sqlite_url, "accounts") == 3
    assert rows(sqlite_url, "SELECT id FROM accounts WHERE email = 'alex@example.com'") == [("acct-1001",)]


def test_accounts_import_refuses_unreadable_files(sqlite_url, cli, tmp_path):
    """A missing file or one that is not UTF-8 is named in a clear error, with nothing imported."""
    refused(cli("accounts", "import", str(tmp_path / "nope.json"), db_url=sqlite_url), "cannot read", "nope.json")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"accounts": [{"id": "Jos\xe9"}]}'.encode("latin-1"))
    refused(cli("accounts", "import", str(latin1), db_url=sqlite_url), "cannot read", "latin1.json")
    assert count(sqlite_url, "accounts") == 0


# ---- cases ---------------------------------------------------------------------------------------------

def test_cases_list_and_show(any_db_url, make_container, cli):
    """`cases list` shows the waiting case, and `cases show` its checks, risk and audit trail."""
    c = make_container(any_db_url)
    case_id = case_awaiting_approval(c)

    listing = ok(cli("cases", "list", db_url=any_db_url))
    line = next(l for l in listing.splitlines() if l.startswith(case_id))
    assert "awaiting_approval" in line and "risk=low" in line and "account=acct-1001" in line
    assert ok(cli("cases", "list", "--state", "completed", db_url=any_db_url)).strip() == "no cases"

    shown = ok(cli("cases", "show", case_id, db_url=any_db_url))
    assert f"case {case_id}: awaiting_approval" in shown
    assert "a***@example.com" in shown and "alex@example.com" not in shown
    assert re.search(r"risk: low", shown)
    checks = dict(re.findall(r"^    (email_code|account_facts|verified_session)\s+(\S+)", shown, re.M))
    assert checks == {"email_code": "pass", "account_facts": "pass", "verified_session": "neutral"}
    trail = shown.split("audit trail:")[1]
    assert re.search(r"open\s+- -> opened by customer \(webchat\)", trail)
    assert re.search(r"start_checks\s+opened -> verifying", trail)
    assert re.search(r"request_approval\s+verifying -> awaiting_approval", trail)
    # the emailed code and any link never appear in what staff see
    assert not re.search(r"\b\d{6}\b", shown) and "/cancel/" not in shown

    refused(cli("cases", "show", "RC-NOPE2345", db_url=any_db_url), "case 'RC-NOPE2345' not found")


def test_case_decisions_from_the_cli(sqlite_url, make_container, cli):
    """A non-approver is refused by name, a denial needs a reason, and an approver's approval sends the link."""
    c = make_container(sqlite_url)
    case_id = case_awaiting_approval(c)
    audit_before = count(sqlite_url, "audit_log")

    refused(cli("cases", "approve", case_id, "--approver", "mallory", db_url=sqlite_url),
            "refused", "mallory is not an approver")
    refused(cli("cases", "deny", case_id, "--approver", "alice", db_url=sqlite_url), "--reason")
    refused(cli("cases", "deny", case_id, "--approver", "alice", "--reason", "   ", db_url=sqlite_url),
            "a denial needs a reason")
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "awaiting_approval"
    assert count(sqlite_url, "approvals") == 0
    # each refusal is on the record (the usage error never reached the domain)
    refusals = rows(sqlite_url, "SELECT actor, reason FROM audit_log WHERE event = 'approval_refused' ORDER BY id")
    assert refusals == [("mallory", "not_authorized"), ("alice", "reason_required")]
    assert count(sqlite_url, "audit_log") == audit_before + 2

    assert f"case {case_id} is now link_sent" in ok(cli("cases", "approve", case_id, "--approver", "alice",
                                                        db_url=sqlite_url))
    assert last_mail(c, "enroll_link")["To"] == "alex@example.com"
    refused(cli("cases", "deny", case_id, "--approver", "bob", "--reason", "late", db_url=sqlite_url),
            "refused", "not allowed in state 'link_sent'")


# ---- audit verify --------------------------------------------------------------------------------------

def _restore(db_url: str, row: dict) -> None:
    cols = ", ".join(row)
    rows(db_url, f"INSERT INTO audit_log ({cols}) VALUES ({', '.join(':' + k for k in row)})", **row)


def test_audit_verify_finds_edits_and_deletions(any_db_url, make_container, cli):
    """`audit verify` exits 0 on an intact chain and 1, naming the record, after an edit or a deletion."""
    c = make_container(any_db_url)
    case_awaiting_approval(c)
    ids = [r[0] for r in rows(any_db_url, "SELECT id FROM audit_log ORDER BY id")]
    assert len(ids) >= 3
    middle, last = ids[len(ids) // 2], ids[-1]
    assert f"audit log intact: {len(ids)} records" in ok(cli("audit", "verify", db_url=any_db_url))

    def verify_fails(at: int, problem: str) -> None:
        result = cli("audit", "verify", db_url=any_db_url)
        assert result.exit_code == 1, result.output
        assert f"audit log BROKEN at record {at}: " in result.output and problem in result.output

    original = rows(any_db_url, "SELECT reason FROM audit_log WHERE id = :id", id=middle)[0][0]
    rows(any_db_url, "UPDATE audit_log SET reason = 'nothing to see' WHERE id = :id", id=middle)
    verify_fails(middle, "does not match its hash")
    rows(any_db_url, "UPDATE audit_log SET reason = :r WHERE id = :id", r=original, id=middle)
    ok(cli("audit", "verify", db_url=any_db_url))

    for victim, blamed, problem in ((middle, ids[ids.index(middle) + 1], "link to the previous record is broken"),
                                    (last, last, "newest records were deleted")):
        saved = rows(any_db_url, "SELECT * FROM audit_log WHERE id = :id", id=victim)[0]._asdict()
        rows(any_db_url, "DELETE FROM audit_log WHERE id = :id", id=victim)
        verify_fails(blamed, problem)
        _restore(any_db_url, saved)
        assert f"intact: {len(ids)} records" in ok(cli("audit", "verify", db_url=any_db_url))


# ---- configuration errors ------------------------------------------------------------------------------

CONFIG_ERRORS = {
    "mysql": ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL", "only sqlite:/// and postgresql://"),
    "smtp scheme": ({"SMTP_URL": "http://x"}, "SMTP_URL", "smtp://"),
    "policy key": ({"RISK_POLICY": '{"bogus":1}'}, "RISK_POLICY", "bogus"),
    "policy json": ({"RISK_POLICY": "{not json"}, "RISK_POLICY", "not valid JSON"),
    "policy zero approvals": ({"RISK_POLICY": '{"levels": {"high": {"approvals": 0}}}'}, "RISK_POLICY",
                              "at least 1"),
    "port": ({"PORT": "eighty"}, "PORT", "integer"),
    "base url": ({"PUBLIC_BASE_URL": "example.com"}, "PUBLIC_BASE_URL", "http://"),
    "short secret": ({"SECRET_KEY": "short"}, "SECRET_KEY", "32 characters"),
    "directory": ({"ACCOUNT_DIRECTORY": "ldap"}, "ACCOUNT_DIRECTORY", "embedded"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
@pytest.mark.parametrize("command", [("db", "upgrade"), ("cases", "list"), ("audit", "verify")])
def test_configuration_errors_name_the_variable(sqlite_url, cli, case, command):
    """A bad setting stops every command with 'configuration error: ...' naming the variable."""
    env, variable, detail = CONFIG_ERRORS[case]
    out = refused(cli(*command, db_url=sqlite_url, **env), "configuration error:", variable, detail)
    assert out.count("configuration error") == 1
