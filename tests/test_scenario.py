"""A whole recovery through the HTTP routes, as a customer and an approver live it."""
from __future__ import annotations

import re
from datetime import timedelta

import pyotp
import requests

from recovery.directory.embedded import EmbeddedDirectory
from tests.conftest import ChatClient, code_in, link_in
from tests.helpers import load_demo


def test_whole_recovery_over_http(any_db_url, live, smtp):
    """Web chat, emailed code, facts, a local approval, /enroll with a real TOTP: the new secret verifies."""
    smtp_url, mailbox = smtp
    server = live(any_db_url, SMTP_URL=smtp_url)
    c = server.container
    load_demo(c)

    chat = ChatClient(server.url)
    assert "email address" in chat.ask("I lost my authenticator")
    assert "6-digit verification code" in chat.ask("alex@example.com")
    owner_notice = mailbox.wait_for("reset_requested", to="alex@example.com")
    assert "/cancel/" in owner_notice.get_body(preferencelist=("plain",)).get_content()
    code = code_in(mailbox.wait_for("verification_code", to="alex@example.com"))
    assert "first deposit" in chat.ask(code)
    assert "currency" in chat.ask("May 2023")
    done = chat.ask("usdt")
    case_id = re.search(r"RC-[A-Z0-9]{8}", done).group(0)

    with c.recovery.service() as svc:
        case = svc.get(case_id)
        assert case.state == "awaiting_approval"
        assert case.risk_level == "low"

    c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
    mailbox.wait_for("approved", to="alex@example.com")
    link = link_in(mailbox.wait_for("enroll_link", to="alex@example.com"), "enroll")
    news = chat.reply()  # no notice window: one message says it is approved and the link is on its way
    assert "approved" in news and "re-enrollment link" in news and "withdrawals are paused for 24 hours" in news

    browser = requests.Session()  # the page ties the link to the browser that starts it
    page = browser.get(link, timeout=10)
    assert page.status_code == 200 and 'name="password"' in page.text
    assert page.headers["Cache-Control"] == "no-store" and page.headers["Referrer-Policy"] == "no-referrer"
    setup = browser.post(link, data={"step": "start", "password": "correct horse battery"}, timeout=10)
    assert setup.status_code == 200 and "<svg" in setup.text
    key = re.search(r'id="setup-key">([^<]+)<', setup.text).group(1).replace(" ", "")
    totp = pyotp.TOTP(key)
    finished = browser.post(link, data={"step": "confirm", "code": totp.now()}, timeout=10)
    assert finished.status_code == 200
    codes = re.findall(r"<li>([0-9a-f-]{23})</li>", finished.text)
    assert len(codes) == 8 and len(set(codes)) == 8

    mailbox.wait_for("completed", to="alex@example.com")
    now = c.clock.now()
    with c.db.transaction() as s:
        directory = EmbeddedDirectory(s, keyring=c.keyring, clock=c.clock)
        assert directory.verify_totp("acct-1001", totp.at(now + timedelta(seconds=30)), now=now)
        assert directory.active_hold("acct-1001") is not None
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "completed"
    assert browser.get(link, timeout=10).status_code == 410
