"""The Intercom channel end to end: really signed webhooks (payloads shaped like Intercom's documented
ones, tests/fixtures/intercom/) sent to the running app, with a local HTTP server playing Intercom's API
and recording every call (tests/intercom_api.py)."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import time

import pytest
import requests
from sqlalchemy import func, select

from bot.intercom.client import API_VERSION
from bot.intercom.inbound import MAX_ATTACHMENT_BYTES
from bot.intercom.parse import customer_message, html_to_text
from recovery import outbox
from recovery.clock import ManualClock
from recovery.config import load_settings
from recovery.errors import ConfigError
from recovery.models import Case, CaseCheck, CaseDocument, Conversation, InboxEvent, OutboxMessage
from tests.conftest import SECRET, code_in
from tests.helpers import load_demo
from tests.intercom_api import (ACCESS_TOKEN, ADMIN_ID, CLIENT_SECRET, OTHER_ADMIN_ID, TEAM_ID, FakeIntercom,
                                admin_echo, customer_event, fixture, settings_for, signed_headers)

USER = "6762f0d51bb69f9f2193bb7f"
LEAD = "6762f0d51bb69f9f2193cc01"
PHRASE = ("legal winner thank year wave sausage worth useful legal winner thank yellow")  # BIP-39 test vector


@pytest.fixture
def api():
    fake = FakeIntercom()
    yield fake
    fake.close()


def post(server, event, *, secret: str = CLIENT_SECRET, headers: dict | None = None) -> requests.Response:
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    return requests.post(f"{server.url}/webhooks/intercom", data=body,
                         headers=headers if headers is not None else signed_headers(body, secret), timeout=10)


class Customer:
    """One Intercom conversation seen from the customer's side: each message is a signed webhook
    (the first `conversation.user.created`, then `conversation.user.replied`)."""

    def __init__(self, server, api: FakeIntercom, conversation: str, *, contact: str = USER,
                 author: str = "user", started: bool = False):
        self.server, self.api, self.conversation = server, api, conversation
        self.contact, self.author, self.sent, self.read = contact, author, int(started), 0

    def say(self, text: str, **extra) -> requests.Response:
        self.sent += 1
        event = customer_event(text, conversation=self.conversation, part=f"{self.conversation}{self.sent:03d}",
                               first=self.sent == 1, contact=self.contact, author=self.author, **extra)
        r = post(self.server, event)
        assert r.status_code == 200 and r.json()["status"] == "stored", r.text
        return r

    def reply(self, timeout: float = 10) -> str:
        texts = self.api.wait_for(lambda: self.api.reply_texts(self.conversation)[self.read:], timeout,
                                  what=f"bot reply #{self.read + 1} in {self.conversation}")
        self.read += 1
        return texts[0]

    def ask(self, text: str, **extra) -> str:
        self.say(text, **extra)
        return self.reply()


def settle(c, timeout: float = 10) -> None:
    """Wait until the worker has processed every stored event and sent everything due."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with c.db.transaction() as s:
            events = s.scalar(select(func.count(InboxEvent.id)).where(InboxEvent.processed_at.is_(None)))
            pending = s.scalar(select(func.count(OutboxMessage.id)).where(OutboxMessage.status == "pending"))
        if not events and not pending:
            time.sleep(0.3)  # one more worker pass: nothing new may appear
            return
        time.sleep(0.05)
    raise AssertionError("the worker did not settle")


def rows(c, model, *where):
    with c.db.transaction() as s:
        return list(s.scalars(select(model).where(*where)))


def check(c, case_id: str, name: str) -> str:
    with c.db.transaction() as s:
        return s.scalar(select(CaseCheck.result).where(CaseCheck.case_id == case_id, CaseCheck.name == name))


# ---- receiving ---------------------------------------------------------------------------------------

def test_guidance_question_is_answered(any_db_url, live, api):
    """"What is 2FA?" in a new Intercom conversation gets the guidance reply, as our admin, on API 2.14."""
    api.add_contact(USER, role="user", external_id="acct-1001")
    server = live(any_db_url, **settings_for(api))
    customer = Customer(server, api, "147000000101")

    answer = customer.ask("What is 2FA?")
    assert "authenticator" in answer.lower() and "password" in answer.lower()
    call = api.replies("147000000101")[0]
    assert call.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert call.headers["Intercom-Version"] == API_VERSION == "2.14"
    assert call.body["type"] == "admin" and call.body["admin_id"] == ADMIN_ID
    assert call.body["body"].startswith("<p>")
    if call.body["message_type"] == "quick_reply":  # buttons offered: each a {text, uuid} option
        assert all(set(o) == {"text", "uuid"} and o["text"] for o in call.body["reply_options"])
    settle(server.container)
    (event,) = rows(server.container, InboxEvent)
    assert event.source == "intercom" and event.processed_at is not None
    assert "event_enc" not in event.payload and event.payload["text_redacted"] == "What is 2FA?"


def test_head_and_ping_are_answered_without_storing(live, sqlite_url, api):
    """HEAD and the `ping` topic get 200 and store nothing; an unhandled topic is acknowledged and ignored."""
    server = live(sqlite_url, worker=False, **settings_for(api))
    assert requests.head(f"{server.url}/webhooks/intercom", timeout=10).status_code == 200
    r = post(server, fixture("ping"))
    assert r.status_code == 200 and r.json() == {"status": "pong"}
    closed = fixture("conversation.admin.replied") | {"topic": "conversation.admin.closed"}
    assert post(server, closed).json() == {"status": "ignored"}
    assert rows(server.container, InboxEvent) == [] and api.calls == []


def test_whole_recovery_from_intercom_reaches_awaiting_approval(any_db_url, live, api, smtp):
    """A signed-in Intercom user recovers: email code from the mailbox, facts, then awaiting_approval,
    with the verified_session check passed from the contact lookup."""
    smtp_url, mailbox = smtp
    api.add_contact(USER, role="user", external_id="acct-1001", email="alex@example.com")
    server = live(any_db_url, SMTP_URL=smtp_url, **settings_for(api))
    c = server.container
    load_demo(c)
    customer = Customer(server, api, "147000000102")

    assert "email address" in customer.ask("I lost my authenticator")
    assert "verification code" in customer.ask("alex@example.com")
    code = code_in(mailbox.wait_for("verification_code", to="alex@example.com"))
    assert "first deposit" in customer.ask(code)
    assert "currency" in customer.ask("May 2023")
    done = customer.ask("usdt")
    case_id = re.search(r"RC-[A-Z0-9]{8}", done).group(0)

    with c.recovery.service() as svc:
        case = svc.get(case_id)
        assert case.state == "awaiting_approval" and case.channel == "intercom"
        assert case.conversation_id == "intercom:147000000102"
    assert check(c, case_id, "verified_session") == "pass"
    assert [call.path for call in api.calls if call.method == "GET"] == [f"/contacts/{USER}"] * 5


@pytest.mark.parametrize("role, external_id", [("lead", None), ("user", "acct-unknown"), ("user", "acct-1002")])
def test_only_a_signed_in_user_of_that_account_passes_verified_session(sqlite_url, live, api, role, external_id):
    """A lead, a user whose external_id is no account, and a user of another account all fail
    verified_session; the case still opens and the same code_sent reply goes out."""
    api.add_contact(LEAD, role=role, external_id=external_id)
    server = live(sqlite_url, **settings_for(api))
    load_demo(server.container)
    customer = Customer(server, api, "147000000103", contact=LEAD, author=role)

    customer.ask("I lost my authenticator")
    assert "verification code" in customer.ask("alex@example.com")
    (case,) = rows(server.container, Case)
    assert check(server.container, case.id, "verified_session") == "neutral"


def test_without_identity_verification_a_user_id_proves_nothing(sqlite_url, live, api):
    """With INTERCOM_IDENTITY_VERIFICATION off (the default), a contact claiming the account's user id is
    still treated as a lead, since anyone can claim a user_id in an unverified Messenger."""
    api.add_contact(USER, role="user", external_id="acct-1001", email="alex@example.com")
    server = live(sqlite_url, **settings_for(api, INTERCOM_IDENTITY_VERIFICATION="false"))
    load_demo(server.container)
    customer = Customer(server, api, "147000000105")
    customer.ask("I lost my authenticator")
    customer.ask("alex@example.com")
    (case,) = rows(server.container, Case)
    assert check(server.container, case.id, "verified_session") == "neutral"


def test_contact_lookup_failure_counts_as_a_lead(sqlite_url, live, api):
    """When Intercom cannot tell who wrote (404 on the contact), the turn still runs, unverified."""
    server = live(sqlite_url, **settings_for(api))  # no contact registered: the lookup answers 404
    load_demo(server.container)
    customer = Customer(server, api, "147000000104")
    customer.ask("I lost my authenticator")
    customer.ask("alex@example.com")
    (case,) = rows(server.container, Case)
    assert check(server.container, case.id, "verified_session") == "neutral"


def test_forged_signatures_are_refused_and_change_nothing(sqlite_url, live, api):
    """A wrong, missing, malformed or other-body signature gets 401: nothing stored, nothing sent."""
    api.add_contact(USER, role="user")
    server = live(sqlite_url, **settings_for(api))
    event = customer_event("I lost my authenticator", conversation="147000000105", part="p1", first=True)
    body = json.dumps(event).encode()
    other = json.dumps(customer_event("hi", conversation="147000000105", part="p2")).encode()
    forged = [
        signed_headers(body, secret="not-the-client-secret"),
        {"Content-Type": "application/json"},
        {"X-Hub-Signature": "", "Content-Type": "application/json"},
        {"X-Hub-Signature": signed_headers(body)["X-Hub-Signature"].replace("sha1=", "sha256="),
         "Content-Type": "application/json"},
        {"X-Hub-Signature": signed_headers(other)["X-Hub-Signature"], "Content-Type": "application/json"},
        {"X-Hub-Signature": "sha1=" + "0" * 40, "Content-Type": "application/json"},
        {"X-Hub-Signature": "sha1=é€".encode(), "Content-Type": "application/json"},  # raw UTF-8 bytes
    ]
    for headers in forged:
        r = post(server, body, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "bad_signature", r.text
    truncated = body[:40]
    r = post(server, truncated, headers=signed_headers(truncated))
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    time.sleep(0.5)  # a worker pass or two
    assert rows(server.container, InboxEvent) == [] and rows(server.container, OutboxMessage) == []
    assert api.calls == []


def test_redelivered_event_gets_one_reply(any_db_url, live, api):
    """The same notification delivered three times is stored once and answered once."""
    api.add_contact(USER, role="user")
    server = live(any_db_url, **settings_for(api))
    event = customer_event("What is 2FA?", conversation="147000000106", part="2500000106", first=True)
    statuses = [post(server, event).json()["status"] for _ in range(3)]
    assert statuses == ["stored", "duplicate", "duplicate"]
    api.wait_for(lambda: api.replies("147000000106"), what="a reply")
    settle(server.container)
    post(server, event)  # once more after it was processed
    settle(server.container)
    assert len(api.replies("147000000106")) == 1
    assert len(rows(server.container, InboxEvent)) == 1


def test_own_reply_echoed_back_is_ignored(sqlite_url, live, api):
    """Our admin's reply sent back as conversation.admin.replied, or as the only part of a user.replied
    event, and another admin's part, are acknowledged and ignored: no echo loop."""
    server = live(sqlite_url, **settings_for(api))
    ours = admin_echo("Two-factor authentication adds a second step", conversation="147000000107", part="31")
    mixed = admin_echo("Two-factor authentication adds a second step", conversation="147000000107", part="32",
                       topic="conversation.user.replied")
    colleague = admin_echo("Hello, Sam from support here", conversation="147000000107", part="33",
                           admin_id=OTHER_ADMIN_ID, topic="conversation.user.replied")
    for event in (ours, mixed, colleague):
        r = post(server, event)
        assert r.status_code == 200 and r.json() == {"status": "ignored"}
    time.sleep(0.5)
    assert rows(server.container, InboxEvent) == [] and api.calls == []


def test_reply_in_a_conversation_the_bot_never_saw_is_handled(sqlite_url, live, api):
    """A conversation.user.replied for a conversation started before the bot (no state, no created event)
    is answered like a new one."""
    api.add_contact(USER, role="user")
    server = live(sqlite_url, **settings_for(api))
    customer = Customer(server, api, "147000000108", started=True)
    assert "authenticator" in customer.ask("what is 2fa").lower()
    assert rows(server.container, Conversation)[0].key == "intercom:147000000108"


def test_reply_to_a_conversation_intercom_does_not_know_is_parked(sqlite_url, live, api):
    """Intercom answering 404 to a reply (conversation deleted) parks that message after one attempt,
    and other conversations are still answered."""
    api.add_contact(USER, role="user")
    api.unknown_conversations.add("147000000109")
    server = live(sqlite_url, **settings_for(api))
    Customer(server, api, "147000000109").say("What is 2FA?")
    assert Customer(server, api, "147000000110").ask("hello")
    settle(server.container)
    dead = rows(server.container, OutboxMessage, OutboxMessage.status == "dead")
    assert len(dead) == 1 and dead[0].attempts == 1 and "HTTP 404 (not_found)" in dead[0].last_error
    assert len(api.replies("147000000109", ok_only=False)) == 1


def test_api_429_then_500_is_retried_with_backoff_and_delivered_once(sqlite_url, live, api):
    """429, then 500: each attempt is one POST (the SDK does not retry), the next waits for the
    dispatcher's backoff, and the third delivers the reply exactly once."""
    api.add_contact(USER, role="user")
    api.fail_next = [429, 500]
    clock = ManualClock()
    server = live(sqlite_url, clock=clock, **settings_for(api))
    Customer(server, api, "147000000111").say("What is 2FA?")

    def reply_row():
        (row,) = rows(server.container, OutboxMessage, OutboxMessage.kind == "chat")
        return row

    def attempts(n):
        return lambda: len(api.replies("147000000111", ok_only=False)) >= n and reply_row().lease_until is None

    api.wait_for(attempts(1), what="first attempt")
    first = reply_row()
    assert first.status == "pending" and first.attempts == 1 and "HTTP 429" in first.last_error
    wait = (first.next_attempt_at - clock.now()).total_seconds()
    assert wait >= outbox.BACKOFF_BASE * 0.8
    time.sleep(0.6)  # several worker passes: nothing is due yet
    assert len(api.replies("147000000111", ok_only=False)) == 1

    clock.advance(seconds=wait + 0.01)
    api.wait_for(attempts(2), what="second attempt")
    second = reply_row()
    assert second.attempts == 2 and "HTTP 500" in second.last_error
    later = (second.next_attempt_at - clock.now()).total_seconds()
    assert later >= outbox.BACKOFF_BASE * 2 * 0.8  # the backoff doubled
    time.sleep(0.3)
    assert len(api.replies("147000000111", ok_only=False)) == 2

    clock.advance(seconds=later + 0.01)
    api.wait_for(lambda: reply_row().status == "sent", what="delivery")
    calls = api.replies("147000000111", ok_only=False)
    assert [c.status for c in calls] == [429, 500, 200]
    assert calls[0].body == calls[1].body == calls[2].body


def test_unreachable_intercom_is_retried_and_a_refusal_is_not(sqlite_url, make_container, api):
    """A connection error leaves the reply queued for a later attempt; a 4xx parks it at once."""
    c = make_container(sqlite_url, **settings_for(api, INTERCOM_API_BASE="http://127.0.0.1:9"))
    with c.db.transaction() as s:
        outbox.enqueue(s, c.keyring, kind="chat", key="k-net", now=c.clock.now(),
                       payload={"conversation": "intercom:147000000119", "message": "menu", "locale": "en",
                                "buttons": ["what_is_2fa"], "context": {}})
    c.dispatcher.run_once()
    (row,) = rows(c, OutboxMessage)
    assert row.status == "pending" and row.attempts == 1 and "ConnectError" in row.last_error
    refused = make_container(sqlite_url, **settings_for(api))
    api.unknown_conversations.add("147000000119")
    with c.db.transaction() as s:
        s.get(OutboxMessage, row.id).next_attempt_at = c.clock.now()
    refused.dispatcher.run_once()
    (row,) = rows(c, OutboxMessage)
    assert row.status == "dead" and row.attempts == 2 and "HTTP 404" in row.last_error


# ---- secrets in chat ---------------------------------------------------------------------------------

def _redact_calls(api: FakeIntercom) -> list[dict]:
    return [c.body for c in api.posts() if c.path == "/conversations/redact"]


def test_pasted_code_is_redacted_here_and_in_intercom(sqlite_url, live, api):
    """An authenticator code sent unprompted is masked in our database, the customer is told we never
    need it, and the part is redacted in Intercom too."""
    api.add_contact(USER, role="user")
    server = live(sqlite_url, **settings_for(api))
    customer = Customer(server, api, "147000000112")
    customer.ask("hello")
    warning = customer.ask("my code is 482913")
    assert "never" in warning.lower()
    settle(server.container)
    redactions = api.wait_for(lambda: _redact_calls(api), what="a redaction")
    assert redactions == [{"type": "conversation_part", "conversation_id": "147000000112",
                           "conversation_part_id": "147000000112002"}]
    stored = json.dumps([e.payload for e in rows(server.container, InboxEvent)])
    assert "482913" not in stored and "event_enc" not in stored


def test_recovery_phrase_is_redacted_and_warned(sqlite_url, live, api):
    """A pasted 12-word recovery phrase is kept nowhere in our database, the customer is warned in their
    language, and the part is redacted in Intercom."""
    api.add_contact(USER, role="user")
    server = live(sqlite_url, **settings_for(api))
    customer = Customer(server, api, "147000000113")
    warning = customer.ask(f"my seed is {PHRASE}")  # the first message: the conversation's source
    settle(server.container)
    assert "phrase" in warning.lower()
    (event,) = rows(server.container, InboxEvent)
    assert "recovery_phrase" in event.payload["secrets"]
    assert _redact_calls(api) == [{"type": "source", "conversation_id": "147000000113",
                                   "source_id": "147000000113001"}]
    with server.container.db.transaction() as s:
        everything = json.dumps([[getattr(r, col.name) for col in type(r).__table__.columns]
                                 for model in (InboxEvent, Conversation, Case)
                                 for r in s.scalars(select(model))], default=str)
    assert "sausage" not in everything and "wave" not in everything


def test_zh_tw_conversation_is_answered_in_zh_tw(sqlite_url, live, api):
    """A contact whose Messenger runs in zh-TW, asking in Chinese, is answered in Traditional Chinese,
    buttons included."""
    api.add_contact(USER, role="user", language="zh-TW")
    server = live(sqlite_url, **settings_for(api))
    renderer = server.container.renderer
    answer = Customer(server, api, "147000000114").ask("什麼是兩步驟驗證？")
    assert re.search(r"[\u4e00-\u9fff]", answer) and "驗證" in answer
    call = api.replies("147000000114")[0]
    labels = [o["text"] for o in call.body.get("reply_options") or []]
    zh_buttons = {renderer.button(k, "zh-TW") for k in ("lost_authenticator", "what_is_2fa", "resend_code")}
    assert all(label in zh_buttons or re.search(r"[\u4e00-\u9fff]", label) for label in labels)
    (conversation,) = rows(server.container, Conversation)
    assert conversation.locale == "zh-TW"


# ---- uploads -----------------------------------------------------------------------------------------

def test_uploaded_attachment_is_downloaded_and_stored_encrypted(sqlite_url, live, api, smtp):
    """An ID photo uploaded during a recovery is downloaded at once and kept encrypted with the case;
    a file over the size cap is not downloaded at all."""
    smtp_url, mailbox = smtp
    api.add_contact(USER, role="user", external_id="acct-1001")
    server = live(sqlite_url, SMTP_URL=smtp_url, **settings_for(api))
    c = server.container
    load_demo(c)
    customer = Customer(server, api, "147000000115")
    customer.ask("I lost my authenticator")
    customer.ask("alex@example.com")
    photo = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
    url = api.add_file("id-card.png", photo)
    too_big = api.add_file("huge.png", b"x")
    customer.ask("Here is my ID card", attachments=[
        {"type": "upload", "name": "id-card.png", "url": url, "content_type": "image/png", "filesize": len(photo)},
        {"type": "upload", "name": "huge.png", "url": too_big, "content_type": "image/png",
         "filesize": MAX_ATTACHMENT_BYTES + 1}])
    settle(c)

    (doc,) = rows(c, CaseDocument)
    (case,) = rows(c, Case)
    assert doc.case_id == case.id and doc.conversation_key == "intercom:147000000115"
    assert (doc.name, doc.content_type, doc.size) == ("id-card.png", "image/png", len(photo))
    assert doc.sha256 == hashlib.sha256(photo).hexdigest()
    assert base64.b64encode(photo).decode() not in doc.content_enc
    assert base64.b64decode(c.keyring.decrypt(doc.content_enc)) == photo
    downloads = [call.path for call in api.calls if call.path.startswith("/files/")]
    assert downloads == ["/files/id-card.png?expires=1764145890&signature=abc"]


def test_attachment_larger_than_declared_is_cut_off(sqlite_url, live, api):
    """A file that states a small size but streams more than the cap is refused, and the message is
    still answered."""
    api.add_contact(USER, role="user")
    server = live(sqlite_url, **settings_for(api))
    url = api.add_file("liar.png", b"\0" * (MAX_ATTACHMENT_BYTES + 1))
    customer = Customer(server, api, "147000000116")
    assert customer.ask("what is 2fa", attachments=[{"type": "upload", "name": "liar.png", "url": url,
                                                     "content_type": "image/png", "filesize": 10}])
    settle(server.container)
    assert rows(server.container, CaseDocument) == []


# ---- handover ----------------------------------------------------------------------------------------

def _has_handover_templates(renderer) -> bool:
    return all(renderer.has_block("chat/messages.j2", b) for b in ("handover", "handover_note"))


def test_handover_posts_reply_then_note_then_assigns_the_team(sqlite_url, make_container, api):
    """A handover reply is followed by an internal note and an assignment to the handover team, each
    delivered on its own."""
    c = make_container(sqlite_url, **settings_for(api, INTERCOM_HANDOVER_TEAM_ID=TEAM_ID))
    if not _has_handover_templates(c.renderer):
        pytest.xfail("the 'handover' and 'handover_note' chat templates are not there yet (guidance work)")
    with c.db.transaction() as s:
        outbox.enqueue(s, c.keyring, kind="chat", key="intercom:147000000117:1:0", now=c.clock.now(),
                       payload={"conversation": "intercom:147000000117", "message": "handover", "locale": "en",
                                "buttons": [], "context": {"case_id": "RC-TEST0001", "state": "verifying",
                                                           "reason": "customer asked for a person"}})
    c.worker.drain()
    posts = api.posts()
    path = "/conversations/147000000117"
    assert [p.path for p in posts] == [f"{path}/reply", f"{path}/reply", f"{path}/parts"]
    reply, note, assign = (p.body for p in posts)
    assert reply["message_type"] in ("comment", "quick_reply") and note["message_type"] == "note"
    assert "RC-TEST0001" in note["body"] and note["admin_id"] == ADMIN_ID
    assert assign == {"message_type": "assignment", "type": "team", "admin_id": ADMIN_ID, "assignee_id": TEAM_ID}


# ---- the channel off, and its settings ------------------------------------------------------------------

def test_channel_off_answers_404_and_never_calls_out(sqlite_url, live, api):
    """Without Intercom settings the webhook is off, and a queued Intercom reply is parked unsent."""
    server = live(sqlite_url, INTERCOM_API_BASE=api.url)
    body = json.dumps(customer_event("hi", conversation="147000000118", part="p1", first=True)).encode()
    assert post(server, body).status_code == 404
    assert requests.head(f"{server.url}/webhooks/intercom", timeout=10).status_code == 404
    c = server.container
    with c.db.transaction() as s:
        outbox.enqueue(s, c.keyring, kind="chat", key="k1", now=c.clock.now(),
                       payload={"conversation": "intercom:147000000118", "message": "menu", "locale": "en",
                                "buttons": [], "context": {}})
    settle(c)
    (row,) = rows(c, OutboxMessage)
    assert row.status == "dead" and "no channel" in row.last_error
    assert api.calls == [] and rows(c, InboxEvent) == []


@pytest.mark.parametrize("settings, named", [
    ({"INTERCOM_ACCESS_TOKEN": "t", "INTERCOM_ADMIN_ID": "1"}, "INTERCOM_CLIENT_SECRET"),
    ({"INTERCOM_ACCESS_TOKEN": "t", "INTERCOM_CLIENT_SECRET": "  ", "INTERCOM_ADMIN_ID": "1"},
     "INTERCOM_CLIENT_SECRET"),
    ({"INTERCOM_ACCESS_TOKEN": "t", "INTERCOM_CLIENT_SECRET": "s"}, "INTERCOM_ADMIN_ID"),
    ({"INTERCOM_CLIENT_SECRET": "s"}, "INTERCOM_ACCESS_TOKEN"),
    ({"INTERCOM_API_BASE": "api.intercom.io"}, "INTERCOM_API_BASE"),
])
def test_incomplete_intercom_settings_stop_start_up(settings, named):
    """A half-configured Intercom channel is a start-up error that names the missing setting."""
    with pytest.raises(ConfigError) as info:
        load_settings(SECRET_KEY=SECRET, **settings)
    assert named in str(info.value)


# ---- reading payloads --------------------------------------------------------------------------------

def test_bodies_are_read_from_html_and_plain_text():
    """HTML bodies (API 2.14) and plain ones (2.15) give the same kind of text: tags gone, entities
    read, line breaks kept; the user's part is found after an admin's."""
    html = customer_message(fixture("conversation.user.replied"))
    assert html.text == "I lost my phone with the authenticator app.\nCan you help?"
    plain = customer_message(fixture("conversation.user.replied.plain"))
    assert plain.text == "I lost my phone with the authenticator app.\nCan you help? Tom & Jerry <3"
    markup = "<p>A&amp;B&nbsp;&lt;3</p><p>two</p><ul><li>x</li><li>y</li></ul>"
    assert html_to_text(markup) == "A&B <3\n\ntwo\n\nx\n\ny"
    event = fixture("conversation.user.replied")
    parts = event["data"]["item"]["conversation_parts"]["conversation_parts"]
    parts.append(admin_echo("ok", conversation="1", part="99")["data"]["item"]["conversation_parts"]
                 ["conversation_parts"][0])
    message = customer_message(event)
    assert (message.part_id, message.author_type, message.part_kind) == ("31000000002", "user", "part")
    created = customer_message(fixture("conversation.user.created"))
    assert (created.part_id, created.part_kind, created.text) == ("2500000001", "source", "What is 2FA?")
    assert created.delivery_key == "intercom:notif_4c1d7a60-cb2b-11f0-8de9-0242ac120002:2500000001"
    with_file = customer_message(fixture("conversation.user.replied.attachment"))
    assert [(a.name, a.content_type, a.filesize) for a in with_file.attachments] == [
        ("id-card.png", "image/png", 48213)]
