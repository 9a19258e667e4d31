"""Timers (docs/states.md): code expiry, verifying and approval expiry, approval reminders, the
notice window, link expiry and the unused-link reminder, driven by a manual clock and the real worker."""
from __future__ import annotations

import logging
import re
from datetime import timedelta

import pyotp
import pytest
import requests
from sqlalchemy import select

from recovery.clock import ManualClock
from recovery.directory.demo import demo_accounts
from recovery.directory.embedded import EmbeddedDirectory
from recovery.errors import IllegalTransition, TokenError
from recovery.models import Approval, OutboxMessage
from tests.conftest import ChatClient, code_in, link_in, text_part
from tests.helpers import load_accounts

ALEX = ("alex@example.com", ("May 2023", "usdt"))     # low risk
MEI = ("mei@example.com", ("Feb 2024", "TWD"))        # medium risk: password changed three days ago
EXPIRED_CHAT = "That code has expired"


class Customer:
    """A customer in the web chat of a live server whose worker we drive by hand on a manual clock."""

    def __init__(self, server, mailbox):
        self.server, self.c, self.mailbox = server, server.container, mailbox
        self.chat = ChatClient(server.url)

    def settle(self) -> list[str]:
        """Let the worker do everything due now; returns the bot's new chat messages."""
        self.c.worker.drain()
        return [m["text"] for m in self.chat.poll() if m["sender"] == "bot"]

    def say(self, text: str) -> list[str]:
        self.chat.say(text)
        return self.settle()

    def later(self, **delta) -> list[str]:
        self.c.clock.advance(**delta)
        return self.settle()

    def emails(self, template: str, to: str) -> list:
        return self.mailbox.find(template, to=to)

    def start(self, email: str) -> None:
        # only the demo account in play: each import hashes a password, which takes a while
        load_accounts(self.c, [a for a in demo_accounts(self.c.clock.now()) if a["email"] == email])
        assert "email address" in self.say("I lost my authenticator")[-1]
        assert "6-digit verification code" in self.say(email)[-1]

    def through_checks(self, email: str, answers: tuple[str, ...]) -> str:
        """From a fresh chat to `awaiting_approval`; returns the case id."""
        self.start(email)
        replies = self.say(code_in(self.emails("verification_code", email)[-1]))
        assert "that code is right" in replies[-1]
        for answer in answers:
            replies = self.say(answer)
        return re.search(r"RC-[A-Z0-9]{8}", replies[-1]).group(0)

    def case(self, case_id: str):
        with self.c.recovery.service() as svc:
            return svc.get(case_id)

    def approve(self, case_id: str, approver: str = "alice") -> list[str]:
        self.c.recovery.decide(case_id, approver=approver, decision="approve", channel="cli")
        return self.settle()

    def staff_events(self, case_id: str) -> list[dict]:
        with self.c.db.transaction() as s:
            rows = s.scalars(select(OutboxMessage).where(OutboxMessage.kind == "staff")
                             .order_by(OutboxMessage.id)).all()
            payloads = [self.c.keyring.decrypt_json(r.payload_enc) for r in rows]
        return [p for p in payloads if p["case_id"] == case_id]

    def account(self, account_id: str):
        """(totp_enabled, active hold) of an embedded-directory account."""
        with self.c.db.transaction() as s:
            directory = EmbeddedDirectory(s, keyring=self.c.keyring, clock=self.c.clock)
            hold = directory.active_hold(account_id)
            return directory.get(account_id).totp_enabled, (hold.until if hold else None)


@pytest.fixture
def customer(any_db_url, live, smtp):
    """A customer talking to a server with the demo accounts, real SMTP and a manual clock."""
    smtp_url, mailbox = smtp
    server = live(any_db_url, worker=False, clock=ManualClock(), SMTP_URL=smtp_url)
    return Customer(server, mailbox)


# ---- the email code --------------------------------------------------------------------------------

def test_email_code_expires_after_ten_minutes_and_resends_are_limited(customer):
    """The code dies after 10 minutes (the chat says so), a resend works, and resends stop after three."""
    email = ALEX[0]
    customer.start(email)
    first = code_in(customer.emails("verification_code", email)[0])

    assert customer.later(minutes=9, seconds=59) == []
    assert any(EXPIRED_CHAT in r for r in customer.later(seconds=1))
    assert EXPIRED_CHAT in customer.say(first)[-1]

    assert "sent a new code" in customer.say("Resend the code")[-1]
    second = code_in(customer.emails("verification_code", email)[1])
    assert "doesn't match" in customer.say(first)[-1], "a superseded code must not work"

    # A newer code outlives the expiry time of the one it replaced: no false "expired" then.
    customer.later(minutes=6)
    assert "sent a new code" in customer.say("resend")[-1]
    third = code_in(customer.emails("verification_code", email)[2])
    assert customer.later(minutes=5) == [], "the replaced code's timer must not say the new one expired"
    assert second != third

    assert "sent a new code" in customer.say("resend")[-1]
    fourth = code_in(customer.emails("verification_code", email)[3])
    assert "already sent several codes" in customer.say("resend")[-1]
    assert len(customer.emails("verification_code", email)) == 4

    assert "that code is right" in customer.say(fourth)[-1]


def test_unfinished_identity_checks_expire_after_a_day(customer):
    """A case left in `verifying` expires after verifying_ttl_hours and the owner is told by email."""
    email = ALEX[0]
    customer.start(email)
    case_id = re.search(r"RC-[A-Z0-9]{8}", text_part(customer.emails("verification_code", email)[0])).group(0)
    ttl = customer.c.deps.policy.verifying_ttl_hours

    customer.later(hours=ttl, seconds=-1)
    assert customer.case(case_id).state == "verifying"
    assert any("expired before it was finished" in r for r in customer.later(seconds=1))
    case = customer.case(case_id)
    assert (case.state, case.final_reason) == ("expired", "checks_timeout")
    (notice,) = customer.emails("expired", email)
    assert case_id in text_part(notice) and "not finished in time" in text_part(notice)


# ---- approvals -------------------------------------------------------------------------------------

def test_unanswered_approval_expires_and_never_turns_into_an_approval(customer):
    """Nobody decides within approval_expiry_hours: the case expires, the owner is emailed, nothing is reset."""
    email, answers = ALEX
    case_id = customer.through_checks(email, answers)
    hours = customer.c.deps.policy.approval_expiry_hours

    customer.later(hours=hours, seconds=-1)
    assert customer.case(case_id).state == "awaiting_approval"
    assert any("expired before it was finished" in r for r in customer.later(seconds=1))
    case = customer.case(case_id)
    assert (case.state, case.final_reason) == ("expired", "approval_timeout")
    (notice,) = customer.emails("expired", email)
    assert "no one on our team decided in time" in text_part(notice)

    with pytest.raises(IllegalTransition):
        customer.c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
    customer.later(days=7)
    assert customer.case(case_id).state == "expired"
    with customer.c.db.transaction() as s:
        assert s.scalars(select(Approval).where(Approval.case_id == case_id)).all() == []
    assert customer.emails("approved", email) == [] and customer.emails("enroll_link", email) == []
    assert customer.account("acct-1001") == (True, None), "no reset and no hold without an approval"


def test_waiting_approval_gets_a_reminder_then_an_escalation(customer, caplog):
    """A request waiting 30 minutes reminds the approvers, at 2 hours it escalates, each exactly once."""
    case_id = customer.through_checks(*ALEX)
    events = lambda: [e["event"] for e in customer.staff_events(case_id)]  # noqa: E731
    assert events() == ["approval_requested"]

    customer.later(minutes=29, seconds=59)
    assert events() == ["approval_requested"]
    with caplog.at_level(logging.WARNING, logger="recoverybot.staff"):
        customer.later(seconds=1)
    assert events() == ["approval_requested", "approval_reminder"]
    assert customer.staff_events(case_id)[-1]["context"] == {"waited_minutes": 30, "risk": "low"}
    assert f"case {case_id}: approval_reminder" in caplog.text

    customer.later(minutes=89, seconds=59)
    assert events() == ["approval_requested", "approval_reminder"]
    customer.later(seconds=1)
    assert events() == ["approval_requested", "approval_reminder", "approval_escalation"]
    assert customer.staff_events(case_id)[-1]["context"] == {"waited_minutes": 120, "risk": "low"}

    customer.later(hours=12)
    assert events().count("approval_reminder") == 1 and events().count("approval_escalation") == 1
    assert customer.case(case_id).state == "awaiting_approval"


# ---- the notice window -----------------------------------------------------------------------------

def test_medium_risk_link_waits_for_the_notice_window(customer):
    """Mei's approved medium-risk case gets no link, reset or hold for 24 h; then all three, with a 48 h hold."""
    email, answers = MEI
    case_id = customer.through_checks(email, answers)
    assert customer.case(case_id).risk_level == "medium"

    assert any("we wait 24 hours" in r for r in customer.approve(case_id))
    (approved,) = customer.emails("approved", email)
    assert "24" in text_part(approved)
    assert customer.emails("enroll_link", email) == []

    customer.later(hours=23, minutes=59, seconds=59)
    assert customer.case(case_id).state == "approved"
    assert customer.emails("enroll_link", email) == []
    assert customer.account("acct-1002") == (True, None), "nothing may change during the notice window"
    assert [e["event"] for e in customer.staff_events(case_id)] == ["approval_requested", "approved"], \
        "a decided case gets no approval reminders"

    replies = customer.later(seconds=1)
    assert any("emailed a re-enrollment link" in r for r in replies)
    assert customer.case(case_id).state == "link_sent"
    (mail,) = customer.emails("enroll_link", email)
    assert link_in(mail, "enroll")
    totp_enabled, hold_until = customer.account("acct-1002")
    assert totp_enabled, "the old factor stays until the new one is confirmed"
    assert hold_until == customer.c.clock.now() + timedelta(hours=48)
    assert "48 小時" in text_part(mail) and "繼續有效" in text_part(mail)  # Mei reads zh-TW


# ---- the re-enrollment link ------------------------------------------------------------------------

def token_of(link: str) -> str:
    return link.rsplit("/", 1)[1]


def test_unused_link_reminder_replaces_the_link_and_the_new_one_works(customer):
    """After 30 unused minutes a fresh link is emailed; the first stops working and the fresh one enrolls."""
    email, answers = ALEX
    case_id = customer.through_checks(email, answers)
    customer.approve(case_id)
    old = link_in(customer.emails("enroll_link", email)[0], "enroll")

    customer.later(minutes=29, seconds=59)
    assert customer.emails("link_reminder", email) == []
    customer.later(seconds=1)
    (reminder,) = customer.emails("link_reminder", email)
    new = link_in(reminder, "enroll")
    assert new != old and "30 minutes" in text_part(reminder)

    assert requests.get(old, timeout=10).status_code == 410
    with pytest.raises(TokenError) as refused:
        customer.c.recovery.enroll_view(token_of(old), None)
    assert refused.value.reason == "revoked"

    browser = requests.Session()
    page = browser.get(new, timeout=10)
    assert page.status_code == 200 and 'name="password"' in page.text
    setup = browser.post(new, data={"step": "start", "password": "correct horse battery"}, timeout=10)
    assert setup.status_code == 200
    key = re.search(r'id="setup-key">([^<]+)<', setup.text).group(1).replace(" ", "")
    code = pyotp.TOTP(key).at(customer.c.clock.now())
    done = browser.post(new, data={"step": "confirm", "code": code}, timeout=10)
    assert done.status_code == 200
    customer.settle()
    assert customer.case(case_id).state == "completed"

    customer.later(hours=2)  # the link-expiry timer died with the completion
    assert customer.case(case_id).state == "completed"
    assert customer.emails("expired", email) == []


def test_unused_link_expires_after_sixty_minutes(customer):
    """An enroll link unused for 60 minutes expires the case; every link of it then answers 410."""
    email, answers = ALEX
    case_id = customer.through_checks(email, answers)
    customer.approve(case_id)
    first = link_in(customer.emails("enroll_link", email)[0], "enroll")
    customer.later(minutes=30)
    fresh = link_in(customer.emails("link_reminder", email)[0], "enroll")

    customer.later(minutes=29, seconds=59)
    assert customer.case(case_id).state == "link_sent"
    assert requests.get(fresh, timeout=10).status_code == 200

    replies = customer.later(seconds=1)
    assert any("expired before it was finished" in r for r in replies)
    case = customer.case(case_id)
    assert (case.state, case.final_reason) == ("expired", "link_timeout")
    (notice,) = customer.emails("expired", email)
    assert "not used in time" in text_part(notice)
    for link in (first, fresh):
        assert requests.get(link, timeout=10).status_code == 410
        assert requests.post(link, data={"step": "start", "password": "correct horse battery"},
                             timeout=10).status_code == 410
        with pytest.raises(TokenError):
            customer.c.recovery.enroll_view(token_of(link), None)
