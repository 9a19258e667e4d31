"""Every way a case can end leaves the real owner safe (issue 7), on SQLite and PostgreSQL.

The account starts with a real second factor (a known TOTP secret and recovery codes). Each test drives a
case to one of its endings through the real routes (chat API, enroll, cancel and lock pages) and the real
worker, then checks the factor is exactly as it was and the old authenticator still logs in through the
directory. Time is a ManualClock, so notice windows and expiries pass without sleeping.
"""
from __future__ import annotations

import re
from datetime import timedelta

import argon2
import pyotp
import pytest
import requests
from sqlalchemy import func, select

from recovery import totp as totp_mod
from recovery.crypto import hash_recovery_code
from recovery.directory.embedded import EmbeddedDirectory
from recovery.models import AuditRecord, LinkToken, OutboxMessage, RecoveryCode, WithdrawalHold
from tests.account_backend import AccountBackend, record
from tests.conftest import ChatClient, code_in, link_in, text_part
from tests.helpers import awaiting_case, folder_mails, get_case, last_mail, open_case
from tests.test_security import (ALEX, ALEX_ID, ALEX_PASSWORD, audit_events, factor, load_demo, manual_clock,
                                 setup_over_http, to_link_sent)


def give_factor(c, account_id: str) -> pyotp.TOTP:
    """The account's current authenticator, as the exchange enrolled it before any recovery."""
    secret = totp_mod.new_secret()
    with c.db.transaction() as s:
        EmbeddedDirectory(s, keyring=c.keyring, clock=c.clock).replace_factor(
            account_id, secret=secret, step=0, recovery_code_hashes=[hash_recovery_code("old-recovery-code")],
            case_id="initial-enrollment")
    return pyotp.TOTP(secret)


def old_factor_logs_in(c, account_id: str, app: pyotp.TOTP) -> bool:
    """A login with the old authenticator, one time step later, checked by the directory."""
    c.clock.advance(seconds=totp_mod.STEP)
    with c.db.transaction() as s:
        return EmbeddedDirectory(s, keyring=c.keyring, clock=c.clock).verify_totp(
            account_id, app.at(c.clock.now()), now=c.clock.now())


def staff_events(c, case_id: str) -> list[str]:
    with c.db.transaction() as s:
        rows = s.scalars(select(OutboxMessage).where(OutboxMessage.kind == "staff").order_by(OutboxMessage.id))
        return [p["event"] for p in (c.keyring.decrypt_json(r.payload_enc) for r in rows) if p["case_id"] == case_id]


def holds(c, account_id: str) -> list[tuple[str, str, object]]:
    with c.db.transaction() as s:
        return [(h.case_id, h.reason, h.until) for h in s.scalars(
            select(WithdrawalHold).where(WithdrawalHold.account_id == account_id).order_by(WithdrawalHold.id))]


@pytest.fixture
def bot(any_db_url, live):
    """A running bot (no background worker: tests drain it) with the demo accounts; Alex has a real factor."""
    server = live(any_db_url, worker=False, clock=manual_clock())
    load_demo(server.container, alex_password=True)
    server.app_of_alex = give_factor(server.container, ALEX_ID)
    return server


# ---- every ending short of completion ------------------------------------------------------------------

def _cancel_from_email(c, case_id: str, template: str) -> None:
    c.worker.drain()
    link = link_in(last_mail(c, template, case_id), "cancel")
    assert requests.post(link, timeout=10).status_code == 200


def end_cancelled_while_verifying(c):
    case_id = open_case(c, ALEX)
    _cancel_from_email(c, case_id, "reset_requested")
    return case_id, "cancelled"


def end_cancelled_awaiting_approval(c):
    case_id = awaiting_case(c, ALEX)
    _cancel_from_email(c, case_id, "reset_requested")
    return case_id, "cancelled"


def end_cancelled_after_link_sent_and_started(c):
    case_id, link = to_link_sent(c)
    setup_over_http(link)  # the attacker got as far as the QR code
    _cancel_from_email(c, case_id, "enroll_link")
    return case_id, "cancelled"


def end_locked_by_wrong_email_codes(c):
    case_id = open_case(c, ALEX)
    with c.recovery.service() as svc:
        for _ in range(5):
            svc.submit_code(case_id, "000000" if code_in(last_mail(c, "verification_code", case_id)) != "000000"
                            else "111111")
    return case_id, "locked"


def end_denied(c):
    case_id = awaiting_case(c, ALEX)
    c.recovery.decide(case_id, approver="alice", decision="deny", reason="the ID photo does not match")
    return case_id, "denied"


def end_expired_unanswered(c):
    case_id = awaiting_case(c, ALEX)
    c.clock.advance(hours=c.deps.policy.approval_expiry_hours, minutes=1)
    c.worker.drain()
    return case_id, "expired"


def end_expired_link_unused(c):
    case_id, link = to_link_sent(c)
    setup_over_http(link)
    c.clock.advance(minutes=c.deps.policy.link_ttl_minutes, seconds=1)
    c.worker.drain()
    return case_id, "expired"


def end_wrong_passwords_on_enroll_page(c):
    case_id, link = to_link_sent(c)
    for _ in range(c.deps.policy.link_max_password_failures):
        requests.post(link, data={"step": "start", "password": "guess"}, timeout=10)
    return case_id, "cancelled"


def end_wrong_codes_on_enroll_page(c):
    case_id, link = to_link_sent(c)
    browser, _ = setup_over_http(link)
    for _ in range(c.deps.policy.link_max_password_failures):
        browser.post(link, data={"step": "confirm", "code": "000000"}, timeout=10)
    return case_id, "cancelled"


def end_cancelled_in_chat_after_link_sent(c):
    chat = ChatClient(c.settings.PUBLIC_BASE_URL)
    for text in ("I lost my authenticator", ALEX):
        chat.say(text)
        c.worker.drain()
    case_id = last_mail(c, "verification_code")["X-Recovery-Case"]
    for text in (code_in(last_mail(c, "verification_code", case_id)), "May 2023", "USDT"):
        chat.say(text)
        c.worker.drain()
    c.recovery.decide(case_id, approver="alice", decision="approve")
    c.worker.drain()
    assert get_case(c, case_id).state == "link_sent"
    chat.say("cancel")
    c.worker.drain()
    return case_id, "cancelled"


ENDINGS = [end_cancelled_while_verifying, end_cancelled_awaiting_approval, end_cancelled_after_link_sent_and_started,
           end_locked_by_wrong_email_codes, end_denied, end_expired_unanswered, end_expired_link_unused,
           end_wrong_passwords_on_enroll_page, end_wrong_codes_on_enroll_page, end_cancelled_in_chat_after_link_sent]


@pytest.mark.parametrize("ending", ENDINGS, ids=lambda f: f.__name__.removeprefix("end_"))
def test_a_case_that_does_not_complete_leaves_the_factor_exactly_as_it_was(bot, ending):
    """Whatever stops the case, the account's factor and recovery codes are byte-for-byte what they were, the
    old authenticator still logs in, and no enroll link of the case works any more."""
    c = bot.container
    before = factor(c, ALEX_ID)
    case_id, final = ending(c)
    c.worker.drain()
    assert get_case(c, case_id).state == final
    assert factor(c, ALEX_ID) == before
    assert old_factor_logs_in(c, ALEX_ID, bot.app_of_alex)
    for mail in folder_mails(c, "enroll_link", case_id=case_id) + folder_mails(c, "link_reminder", case_id=case_id):
        assert requests.get(link_in(mail, "enroll"), timeout=10).status_code == 410


def test_completion_replaces_the_old_factor_in_one_step(bot):
    """Only the confirming code replaces the factor: the old authenticator works until then, the new one after."""
    c = bot.container
    case_id, link = to_link_sent(c)
    browser, key = setup_over_http(link)
    assert old_factor_logs_in(c, ALEX_ID, bot.app_of_alex)  # still, with the QR code on screen
    done = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
    assert done.status_code == 200 and "recovery-codes" in done.text
    assert get_case(c, case_id).state == "completed"
    assert not old_factor_logs_in(c, ALEX_ID, bot.app_of_alex)
    assert old_factor_logs_in(c, ALEX_ID, pyotp.TOTP(key))
    # the codes on the page, and no others, are the account's recovery codes now, as argon2id hashes
    # that argon2's stock verifier checks (the account service's side of the contract)
    shown = re.findall(r"\b[0-9a-f]{5}(?:-[0-9a-f]{5}){3}\b", done.text)
    with c.db.reading() as s:
        stored = list(s.scalars(select(RecoveryCode.code_hash).where(RecoveryCode.account_id == ALEX_ID)))
    assert len(set(shown)) == len(stored) == 8
    assert all(h.startswith("$argon2id$") for h in stored)
    # OWASP's minimum argon2id cost (80 random bits need no more), not the password default
    assert {(p.time_cost, p.memory_cost, p.parallelism) for p in map(argon2.extract_parameters, stored)} \
        == {(2, 19 * 1024, 1)}
    # eight distinct codes each matching one of eight hashes: one hash per code
    assert all(any(_verifies(h, code) for h in stored) for code in shown)
    assert not any(_verifies(h, "old-recovery-code") for h in stored)


def _verifies(stored: str, code: str) -> bool:
    try:
        return argon2.PasswordHasher().verify(stored, code)
    except argon2.exceptions.VerificationError:
        return False


def test_the_hold_stays_when_a_case_ends_after_the_link_went_out_and_the_email_says_until_when(bot):
    """A hold placed with the link is never shortened by the case ending early, and the owner is told its end."""
    c = bot.container
    case_id, end = end_cancelled_after_link_sent_and_started(c)
    c.worker.drain()
    [(held_case, reason, until)] = holds(c, ALEX_ID)
    assert (held_case, reason) == (case_id, "2fa_recovery")
    assert until == get_case(c, case_id).hold_until
    assert until.strftime("%Y-%m-%d %H:%M UTC") in text_part(last_mail(c, "cancelled", case_id))


# ---- cancel links: their own case, once ---------------------------------------------------------------------

def test_a_cancel_link_used_twice_has_one_effect(bot):
    """The second POST of a cancel link shows what already happened and writes no record, no hold, no alert."""
    c = bot.container
    case_id = awaiting_case(c, ALEX)
    link = link_in(last_mail(c, "reset_requested", case_id), "cancel")
    first = requests.post(link, timeout=10)
    assert first.status_code == 200 and "is cancelled" in first.text
    c.worker.drain()
    after_first = (len(audit_events(c, case_id)), staff_events(c, case_id), holds(c, ALEX_ID),
                   get_case(c, case_id).version, len(folder_mails(c, "cancelled", case_id=case_id)))
    second = requests.post(link, timeout=10)
    assert second.status_code == 200 and "already cancelled" in second.text
    c.worker.drain()
    assert (len(audit_events(c, case_id)), staff_events(c, case_id), holds(c, ALEX_ID),
            get_case(c, case_id).version, len(folder_mails(c, "cancelled", case_id=case_id))) == after_first
    assert staff_events(c, case_id).count("cancelled") == 1
    assert [r.event for r in audit_events(c, case_id)].count("cancel") == 1
    other = link_in(last_mail(c, "verification_code", case_id), "cancel")  # another link of the same case
    assert "already ended" in requests.post(other, timeout=10).text
    assert len(audit_events(c, case_id)) == after_first[0]


def test_an_old_cases_cancel_link_leaves_a_newer_case_alone(bot):
    """A cancel link from a completed case, posted while a new case is open, changes neither case and places no
    hold; the page tells the owner where the lock link is."""
    c = bot.container
    old_id, link = to_link_sent(c)
    browser, key = setup_over_http(link)
    browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
    c.worker.drain()
    old_cancel = link_in(last_mail(c, "enroll_link", old_id), "cancel")
    c.clock.advance(days=1)
    new_id = awaiting_case(c, ALEX)
    holds_before, new_before = holds(c, ALEX_ID), get_case(c, new_id).version
    page = requests.get(old_cancel, timeout=10)
    assert page.status_code == 200 and "was completed" in page.text and 'id="cancel"' not in page.text
    answer = requests.post(old_cancel, timeout=10)
    assert answer.status_code == 200 and "was completed" in answer.text
    assert get_case(c, new_id).state == "awaiting_approval" and get_case(c, new_id).version == new_before
    assert get_case(c, old_id).state == "completed"
    assert holds(c, ALEX_ID) == holds_before
    assert "owner_locked" not in [r.event for r in audit_events(c, old_id)]


# ---- the completion email's lock link ----------------------------------------------------------------------

def test_the_lock_link_says_what_it_does_then_acts_once(bot):
    """GET explains the hold and its length and changes nothing; the first POST holds withdrawals for 7 days
    and alerts staff; a second POST changes nothing and says when it was done."""
    c = bot.container
    case_id, link = to_link_sent(c)
    browser, key = setup_over_http(link)
    browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
    c.worker.drain()
    done = last_mail(c, "completed", case_id)
    lock = re.search(r"https?://\S+/lock/[A-Za-z0-9_\-]+", text_part(done)).group(0)
    assert "/cancel/" not in text_part(done) and "7 days" in text_part(done)
    holds_before = holds(c, ALEX_ID)

    page = requests.get(lock, timeout=10)
    assert page.status_code == 200 and "7 days (168 hours)" in page.text and 'id="lock"' in page.text
    assert page.headers["Cache-Control"] == "no-store" and holds(c, ALEX_ID) == holds_before
    first = requests.post(lock, timeout=10)
    assert first.status_code == 200 and "Done." in first.text
    held = [h for h in holds(c, ALEX_ID) if h[1] == "owner_dispute"]
    assert len(held) == 1 and held[0][2] == c.clock.now() + timedelta(days=7)
    c.worker.drain()
    assert staff_events(c, case_id).count("owner_disputed") == 1

    c.clock.advance(hours=1)
    second = requests.post(lock, timeout=10)
    assert second.status_code == 200 and "already done" in second.text
    assert [h for h in holds(c, ALEX_ID) if h[1] == "owner_dispute"] == held
    c.worker.drain()
    assert staff_events(c, case_id).count("owner_disputed") == 1
    assert [r.event for r in audit_events(c, case_id)].count("owner_locked") == 1
    assert "already done" in requests.get(lock, timeout=10).text


# ---- token pages are rate-limited per client address ---------------------------------------------------

def test_link_pages_answer_429_with_retry_after_alike_for_every_kind_of_token(any_db_url, live):
    """Past the per-address limit, unknown, used, expired and live tokens all get 429 with Retry-After, and the
    limit (a setting) lifts once the window has passed."""
    server = live(any_db_url, worker=False, clock=manual_clock(),
                  RISK_POLICY='{"link_lookups_per_ip": 6, "link_lookup_window_minutes": 10}')
    c = server.container
    load_demo(c, alex_password=True)
    case_id, link = to_link_sent(c)
    cancel = link_in(last_mail(c, "reset_requested", case_id), "cancel")
    unknown = f"{server.url}/cancel/{'x' * 43}"
    answers = [requests.get(u, timeout=10).status_code for u in (unknown, unknown, link, cancel, unknown, link)]
    assert answers == [404, 404, 200, 200, 404, 200]
    for url in (unknown, link, cancel, f"{server.url}/enroll/{'y' * 43}", f"{server.url}/lock/{'z' * 43}"):
        for method in (requests.get, requests.post):
            r = method(url, timeout=10)
            assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 600, url
            assert "Too many link requests" in r.text
    assert get_case(c, case_id).state == "link_sent"  # the refused POST to the cancel link did nothing
    c.clock.advance(minutes=10, seconds=1)
    assert requests.get(link, timeout=10).status_code == 200


# ---- refusals are honest without enumerating --------------------------------------------------------------

def _start(server, address: str) -> list[str]:
    chat = ChatClient(server.url)
    chat.say("I lost my authenticator")
    server.container.worker.drain()
    chat.poll()
    chat.say(address)
    server.container.worker.drain()
    return [m["text"] for m in chat.poll() if m["sender"] == "bot"]


def test_every_start_gets_the_same_true_reply_and_the_owner_learns_why_a_start_was_refused(bot):
    """Known, unknown, already-open and over-the-limit starts get one and the same chat reply, which stays true;
    the owner's email names a refusal's reason: the open case (with its cancel link), or the limit (with the
    date it resets and the support address)."""
    c = bot.container
    known = _start(bot, ALEX)
    unknown = _start(bot, "nobody@example.com")
    already_open = _start(bot, ALEX)
    assert known == unknown == already_open and len(known) == 1
    assert "can start a recovery now" in known[0] and "spam" in known[0]
    c.worker.drain()
    [refused] = folder_mails(c, "start_refused", to=ALEX)
    with c.db.transaction() as s:
        open_id = s.scalar(select(AuditRecord.case_id).where(AuditRecord.event == "open",
                                                             AuditRecord.reason.is_(None)).limit(1))
    body = text_part(refused)
    assert open_id in body and "already in progress" in body and "/cancel/" in body
    assert not folder_mails(c, to="nobody@example.com")

    def verified_then_cancelled(case_id: str) -> None:
        """The owner's own case: the emailed code typed right (only such cases count toward the limit)."""
        c.worker.drain()
        with c.recovery.service() as svc:
            assert svc.submit_code(case_id, code_in(last_mail(c, "verification_code", case_id))).status == "ok"
            svc.cancel(case_id, actor="customer", channel="webchat", reason="customer_cancelled")

    def newest_case() -> str:
        with c.db.transaction() as s:
            return s.scalar(select(AuditRecord.case_id).where(AuditRecord.event == "open")
                            .order_by(AuditRecord.id.desc()).limit(1))

    verified_then_cancelled(open_id)
    _start(bot, ALEX)                    # the second case in 30 days
    verified_then_cancelled(newest_case())
    c.clock.advance(hours=7)            # past the owner-notice throttle
    _start(bot, ALEX)                    # the third
    verified_then_cancelled(newest_case())
    c.clock.advance(hours=7)
    over_limit = _start(bot, ALEX)
    assert over_limit == known
    c.worker.drain()
    refusal = folder_mails(c, "start_refused", to=ALEX)[-1]
    body = text_part(refusal)
    assert "limit of 3 recovery requests in 30 days" in body and c.settings.SUPPORT_EMAIL in body
    with c.db.transaction() as s:
        first_open = min(s.scalars(select(AuditRecord.at).where(AuditRecord.event == "open",
                                                                AuditRecord.reason.is_(None))))
    assert (first_open + timedelta(days=30)).strftime("%Y-%m-%d %H:%M UTC") in body
    with c.db.transaction() as s:
        assert s.scalar(select(func.count(LinkToken.id)).where(LinkToken.kind == "enroll")) == 0


def test_an_account_service_outage_on_the_enroll_page_changes_nothing_and_the_same_link_works_after(sqlite_url,
                                                                                                   live):
    """With the http directory, a backend that fails the factor replacement gets the customer a 503 page that
    says to try again (Retry-After), the case and the account's factor stay as they were, and the same link
    and browser then complete with the same recovery codes, replaced once."""
    backend = AccountBackend()
    backend.add(record(ALEX_ID, ALEX), password=ALEX_PASSWORD)
    old = totp_mod.new_secret()
    backend.factors[ALEX_ID] = {"secret": old, "last_step": 0, "recovery_code_hashes": ["old"]}
    server = live(sqlite_url, worker=False, clock=manual_clock(), **backend.settings())
    try:
        c = server.container
        case_id, link = to_link_sent(c)
        browser, key = setup_over_http(link)
        backend.failing.add("2fa/replace")
        down = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
        assert down.status_code == 503 and down.headers["Retry-After"] == "60" and "try again" in down.text
        assert get_case(c, case_id).state == "link_sent"
        assert backend.factors[ALEX_ID]["secret"] == old
        backend.failing.clear()
        c.clock.advance(seconds=totp_mod.STEP)
        done = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
        assert done.status_code == 200 and "recovery-codes" in done.text
        assert get_case(c, case_id).state == "completed"
        assert backend.factors[ALEX_ID]["secret"] == key
        assert len(backend.factors[ALEX_ID]["recovery_code_hashes"]) == 8
    finally:
        backend.close()


def _http_bot(live, sqlite_url, backend: AccountBackend):
    backend.add(record(ALEX_ID, ALEX), password=ALEX_PASSWORD)
    backend.factors[ALEX_ID] = {"secret": totp_mod.new_secret(), "last_step": 0, "recovery_code_hashes": ["old"]}
    return live(sqlite_url, worker=False, clock=manual_clock(), **backend.settings())


def test_a_replacement_that_got_no_answer_is_settled_before_the_case_can_end_any_other_way(sqlite_url, live):
    """The backend replaces the factor but its answer is lost: the page says try again, and when the link
    expires the bot first retries the replacement (same key, same data), so the case ends `completed`, with
    the completion email and its lock link, never as "expired, your 2FA is unchanged"."""
    backend = AccountBackend()
    server = _http_bot(live, sqlite_url, backend)
    try:
        c = server.container
        case_id, link = to_link_sent(c)
        browser, key = setup_over_http(link)
        backend.lost_answers.add("2fa/replace")
        lost = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
        assert lost.status_code == 503
        assert backend.factors[ALEX_ID]["secret"] == key  # it did happen
        assert get_case(c, case_id).state == "link_sent"
        backend.lost_answers.clear()
        c.clock.advance(minutes=c.deps.policy.link_ttl_minutes, seconds=1)
        c.worker.drain()
        assert get_case(c, case_id).state == "completed"
        assert not folder_mails(c, "expired", case_id=case_id)
        assert "/lock/" in text_part(last_mail(c, "completed", case_id))
        assert [e.event for e in audit_events(c, case_id)][-1] == "complete"
    finally:
        backend.close()


def test_turns_after_the_start_ask_the_account_directory_nothing(sqlite_url, live):
    """Resending the code and cancelling, the turns anyone can make after naming an address, make no call
    to the account backend for a registered address (a stand-in could not make one: its time would tell)."""
    backend = AccountBackend()
    server = _http_bot(live, sqlite_url, backend)
    try:
        c = server.container
        chat = ChatClient(server.url)
        for text in ("I lost my authenticator", ALEX):
            chat.say(text)
            c.worker.drain()
        assert backend.requests == [("POST", "/accounts/lookup")]
        for text in ("resend the code", "cancel"):
            chat.say(text)
            c.worker.drain()
        assert backend.requests == [("POST", "/accounts/lookup")]
        assert [r.event for r in audit_events(c, last_mail(c, "verification_code")["X-Recovery-Case"])][-1] == "cancel"
        assert len(folder_mails(c, "verification_code", to=ALEX)) == 2
    finally:
        backend.close()


def test_starts_that_never_pass_the_code_neither_use_up_the_owners_cases_nor_flood_them(bot):
    """Someone who only knows the owner's address opens and drops cases: those never count toward the 30-day
    limit or the owner's risk, and the owner gets at most three 'reset requested' notices a day (each
    start's code email, with its cancel link, still goes out); the owner can then start and is low risk."""
    c = bot.container
    for _ in range(5):
        case_id = open_case(c, ALEX)
        with c.recovery.service() as svc:
            svc.cancel(case_id, actor="customer", channel="webchat", reason="customer_cancelled")
    c.worker.drain()
    assert len(folder_mails(c, "reset_requested", to=ALEX)) == 3
    assert len(folder_mails(c, "verification_code", to=ALEX)) == 5
    assert not folder_mails(c, "start_refused", to=ALEX)
    owner = awaiting_case(c, ALEX)  # a real start: not refused, and checks pass
    case = get_case(c, owner)
    assert case.account_id == ALEX_ID and case.risk_level == "low" and "earlier_recovery" not in case.risk_reasons
