"""Test helpers that use the product's own code paths (no mocks)."""
from __future__ import annotations

import email
import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from email.policy import default as default_policy
from pathlib import Path

from recovery.directory.demo import demo_accounts
from recovery.directory.embedded import EmbeddedDirectory
from recovery.directory.importer import validate
from recovery.models import Case
from tests.conftest import code_in


def load_accounts(container, records: list[dict]) -> None:
    with container.db.transaction() as s:
        directory = EmbeddedDirectory(s, keyring=container.keyring, clock=container.clock)
        for i, rec in enumerate(records):
            raw = json.loads(json.dumps(rec, default=lambda d: d.isoformat()))
            directory.upsert(validate(raw, f"accounts[{i}]"))


def load_demo(container) -> None:
    load_accounts(container, demo_accounts(container.clock.now()))


def account(id: str, email: str, *, days_old: int = 900, events=(), balance: int = 0, **extra) -> dict:
    now = datetime.now(timezone.utc)
    return {"id": id, "email": email, "password": "pw-" + id, "locale": "en",
            "created_at": now - timedelta(days=days_old), "totp_enabled": True,
            "facts": {"first_deposit_month": "2023-05", "last_withdrawal_currency": "USDT"},
            "events": [{"type": t, "at": now - timedelta(days=d)} for t, d in events],
            "balance_usd": balance, **extra}


# ---- mail the local mailer wrote, and cases driven through the domain --------------------------------

def folder_mails(c, template: str | None = None, *, case_id: str | None = None, to: str | None = None):
    """Emails the local mailer wrote (MAIL_OUTBOX_DIR), oldest first."""
    folder = Path(c.settings.MAIL_OUTBOX_DIR)
    found = []
    for path in sorted(folder.glob("*.eml")) if folder.exists() else []:
        msg = email.message_from_bytes(path.read_bytes(), policy=default_policy)
        if ((template is None or msg["X-Recovery-Template"] == template)
                and (case_id is None or msg["X-Recovery-Case"] == case_id)
                and (to is None or msg["To"] == to)):
            found.append(msg)
    return found


def last_mail(c, template: str, case_id: str | None = None, timeout: float = 10):
    """The newest such email, waiting for it: with a live worker running, its mail loop may be the one
    sending it while the test's own drain finds nothing left to send."""
    deadline = time.monotonic() + timeout
    while not (mails := folder_mails(c, template, case_id=case_id)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mails, f"no {template!r} email" + (f" for {case_id}" if case_id else "")
    return mails[-1]


def get_case(c, case_id: str) -> Case:
    with c.recovery.service() as svc:
        return svc.get(case_id)


def open_case(c, address: str, *, opened_by: str = "customer", conversation_key: str | None = None) -> str:
    """Open a case as the chat would (or as staff, with opened_by) and send out its first emails."""
    with c.recovery.service() as svc:
        case_id = svc.open(conversation_key=conversation_key or f"webchat:{uuid.uuid4().hex}",
                           channel="webchat", email=address, locale="en", opened_by=opened_by).id
    c.worker.drain()
    return case_id


def pass_checks(c, case_id: str, code: str | None = None) -> Case:
    """Type the emailed code and answer the account questions correctly."""
    code = code or code_in(last_mail(c, "verification_code", case_id))
    with c.recovery.service() as svc:
        assert svc.submit_code(case_id, code).status == "ok"
        case = svc.get(case_id)
        facts = svc.directory.get(case.account_id).facts
        question = svc.next_question(case)
    while question is not None:
        with c.recovery.service() as svc:
            question = svc.answer_fact(case_id, facts[question])
    c.worker.drain()
    case = get_case(c, case_id)
    assert case.state == "awaiting_approval", case.state
    return case


def awaiting_case(c, address: str, *, opened_by: str = "customer", conversation_key: str | None = None) -> str:
    case_id = open_case(c, address, opened_by=opened_by, conversation_key=conversation_key)
    pass_checks(c, case_id)
    return case_id


def wait_until_answers(url: str, *, timeout: float, process=None, output=lambda: "", interval: float = 0.1) -> None:
    """Wait for a process that is starting up: poll `url` until it answers 200. Raises AssertionError at
    once, with `output()`, when `process` (a Popen) has exited, and naming the URL when `timeout` seconds
    pass first. Shared by the tests and the benchmarks that start `recoverybot` processes."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process serving {url} exited: {output()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(interval)
    raise AssertionError(f"{url} did not answer 200 within {timeout:.0f} s")
