"""Bad input at the HTTP boundary gets a clear 4xx that names the problem, and changes nothing.

Runs on SQLite and PostgreSQL: some inputs (a NUL character, say) are only refused by one of them, and
the app must refuse them itself before either database sees them.
"""
from __future__ import annotations

import json
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from bot.web import MAX_BODY, create_app
from bot.webchat import MAX_PAGE, MAX_TEXT
from recovery.models import ChatMessage
from tests.conftest import link_in
from tests.helpers import awaiting_case, last_mail, load_demo

TABLES = ("inbox_events", "chat_messages", "chat_sessions", "cases", "audit_log", "outbox", "link_tokens")


def counts(c) -> dict[str, int]:
    with c.db.transaction() as s:
        return {t: s.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}


class Chat:
    """The Flask test client plus one chat session, with row counts to prove nothing changed."""

    def __init__(self, container):
        self.c = container
        self.client = create_app(container).test_client()
        r = self.client.post("/chat/api/sessions", json={"locale": "en"})
        assert r.status_code == 201, r.text
        self.sid = r.get_json()["session_id"]
        self.messages = f"/chat/api/sessions/{self.sid}/messages"

    def post(self, path: str, body, content_type: str = "application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(path, data=data, content_type=content_type)


@pytest.fixture
def chat(any_db_url, make_container):
    return Chat(make_container(any_db_url))


def assert_refused(resp, status: int, error: str, *phrases: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.mimetype == "application/json", resp.mimetype
    body = resp.get_json()
    assert body["error"] == error, body
    for phrase in phrases:
        assert phrase in body["message"], (phrase, body)


# ---- bodies --------------------------------------------------------------------------------------------

BAD_BODIES = [
    # (body, status, error, phrase in the message)
    (b'{"text": "hi"', 400, "malformed_json", "not valid JSON"),
    (b"{'text': 'hi'}", 400, "malformed_json", "not valid JSON"),
    (b"\xff\xfe\xfa garbage", 400, "malformed_json", "not valid JSON"),
    (b"[" * 50_000 + b"]" * 50_000, 400, "malformed_json", "nested too deeply"),
    (b"", 400, "empty_body", "JSON object"),
    (b"  \n ", 400, "empty_body", "JSON object"),
    (b"[]", 400, "not_an_object", "JSON object"),
    (b'["text", "hi"]', 400, "not_an_object", "JSON object"),
    (b'"hi"', 400, "not_an_object", "JSON object"),
    (b"42", 400, "not_an_object", "JSON object"),
    (b"null", 400, "not_an_object", "JSON object"),
    (b"{}", 400, "bad_text", '{"text": "..."}'),
    (b'{"message": "hi"}', 400, "bad_text", '{"text": "..."}'),
    (b'{"text": ""}', 400, "bad_text", "non-empty string"),
    (b'{"text": " \\n\\t "}', 400, "bad_text", "non-empty string"),
    (b'{"text": null}', 400, "bad_text", "non-empty string"),
    (b'{"text": 123456}', 400, "bad_text", "non-empty string"),
    (b'{"text": ["hi"]}', 400, "bad_text", "non-empty string"),
    (b'{"text": {"en": "hi"}}', 400, "bad_text", "non-empty string"),
    (b'{"text": true}', 400, "bad_text", "non-empty string"),
    (b'{"text": "a\\u0000b"}', 400, "bad_text", "NUL"),
    (b'{"text": "lone \\ud800 surrogate"}', 400, "bad_text", "valid Unicode"),
    (b'{"text": "hi", "client_id": 7}', 400, "bad_client_id", "1 to 100 characters"),
    (b'{"text": "hi", "client_id": ""}', 400, "bad_client_id", "1 to 100 characters"),
    (json.dumps({"text": "hi", "client_id": "x" * 101}).encode(), 400, "bad_client_id", "1 to 100"),
    (b'{"text": "hi", "client_id": "a\\u0000"}', 400, "bad_client_id", "no NUL"),
    (b'{"text": "hi", "client_id": "\\udfff"}', 400, "bad_client_id", "valid Unicode"),
    (json.dumps({"text": "x" * (MAX_TEXT + 1)}).encode(), 413, "text_too_long", f"at most {MAX_TEXT}"),
    (json.dumps({"text": "字" * (MAX_TEXT + 1)}).encode(), 413, "text_too_long", f"at most {MAX_TEXT}"),
]


def test_bad_message_bodies_are_refused_and_change_nothing(chat):
    """Malformed JSON, non-objects and missing, empty, non-string or oversized text each get a named 4xx."""
    before = counts(chat.c)
    for body, status, error, phrase in BAD_BODIES:
        assert_refused(chat.post(chat.messages, body), status, error, phrase)
    assert counts(chat.c) == before


def test_message_limits_are_exact(chat):
    """A message of exactly the limit is accepted, and one character more is refused with 413."""
    before = counts(chat.c)
    assert_refused(chat.post(chat.messages, {"text": "y" * (MAX_TEXT + 1)}), 413, "text_too_long")
    assert counts(chat.c) == before
    r = chat.post(chat.messages, {"text": "y" * MAX_TEXT, "client_id": "c" * 100})
    assert r.status_code == 202 and r.get_json() == {"accepted": True, "duplicate": False}
    after = counts(chat.c)
    assert after["inbox_events"] == before["inbox_events"] + 1
    assert after["chat_messages"] == before["chat_messages"] + 1


def test_oversized_bodies_are_refused_before_they_are_read(chat):
    """A body over 256 KiB gets 413 on both JSON routes, whatever it contains."""
    before = counts(chat.c)
    huge = json.dumps({"text": "hi", "padding": "p" * MAX_BODY}).encode()
    for path in (chat.messages, "/chat/api/sessions"):
        assert_refused(chat.post(path, huge), 413, "request_entity_too_large", "at most 256 KiB")
    assert counts(chat.c) == before


def test_oversized_chunked_body_over_real_http(sqlite_url, live):
    """A chunked upload (no Content-Length) over 256 KiB gets the same 413 from a real server, rather than
    being truncated at the limit and parsed."""
    server = live(sqlite_url, worker=False)
    sid = requests.post(f"{server.url}/chat/api/sessions", json={}, timeout=10).json()["session_id"]
    before = counts(server.container)

    def chunks():
        yield b'{"text": "hi", "padding": "'
        for _ in range(MAX_BODY // 16_384 + 2):
            yield b"p" * 16_384
        yield b'"}'

    r = requests.post(f"{server.url}/chat/api/sessions/{sid}/messages", data=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413, r.text
    assert r.json() == {"error": "request_entity_too_large", "message": "the request body may be at most 256 KiB"}
    assert counts(server.container) == before


def test_session_creation_refuses_bad_bodies(chat):
    """Creating a session needs no body, but a body that is there must be a JSON object with a string locale."""
    before = counts(chat.c)
    assert_refused(chat.post("/chat/api/sessions", b"{nope"), 400, "malformed_json", "not valid JSON")
    assert_refused(chat.post("/chat/api/sessions", b"[1]"), 400, "not_an_object", "JSON object")
    assert_refused(chat.post("/chat/api/sessions", {"locale": 5}), 400, "bad_locale", "locale must be a string")
    assert_refused(chat.post("/chat/api/sessions", {"locale": ["en"]}), 400, "bad_locale", "'zh-TW'")
    assert counts(chat.c) == before
    r = chat.post("/chat/api/sessions", {"locale": "klingon"})
    assert r.status_code == 201 and "Hi!" in r.get_json()["messages"][0]["text"]  # unknown locale: English


# ---- routes, sessions and parameters -------------------------------------------------------------------

def test_unknown_sessions_get_404(chat):
    """Posting to or reading a session that does not exist is a 404 naming the session, for any id shape."""
    before = counts(chat.c)
    for sid in ("no-such-session", "A" * 24, "x" * 65, "%00", "bad%20id", "%2e%2e", "中文"):
        path = f"/chat/api/sessions/{sid}/messages"
        assert_refused(chat.post(path, {"text": "hi"}), 404, "unknown_session", "no chat session")
        assert_refused(chat.client.get(path), 404, "unknown_session", "no chat session")
    assert counts(chat.c) == before


BAD_AFTER = ["-1", "abc", "1.5", "", "%201", "0x10", "%C2%B2", "%D9%A1", "1e3", "99999999999999999999999", "%00"]


def test_bad_after_param_is_refused(chat):
    """`after` must be a plain non-negative whole number (superscripts, Arabic digits and numbers past
    64 bits included); anything else is a 400, never a crash."""
    for after in BAD_AFTER:
        assert_refused(chat.client.get(f"{chat.messages}?after={after}"), 400, "bad_after",
                       "non-negative whole number")


BAD_POST_AFTER = [-1, "3", 1.5, True, 2**63, [1], {"seq": 1}]


def test_bad_after_in_a_posted_message_is_refused_and_stores_nothing(chat):
    before = counts(chat.c)
    for after in BAD_POST_AFTER:
        assert_refused(chat.post(chat.messages, {"text": "what is 2fa?", "after": after}), 400, "bad_after",
                       "non-negative whole number")
    assert counts(chat.c) == before


BAD_WAIT = ["-1", "abc", "1.5", "", "21", "100", "%C2%B2", "%D9%A1", "1e1", "%00"]


def test_bad_wait_param_is_refused(chat):
    """`wait` must be a whole number of seconds from 0 to 20: anything else is a 400 at once, which
    neither waits nor holds a waiting slot."""
    for wait in BAD_WAIT:
        started = time.monotonic()
        assert_refused(chat.client.get(f"{chat.messages}?after=0&wait={wait}"), 400, "bad_wait",
                       "whole number of seconds from 0 to 20")
        assert time.monotonic() - started < 0.5, wait
    assert chat.c.chat_waiters.waiting == 0


BAD_POST_WAIT = [-1, 21, "1", 1.5, True, False, [1], {"s": 1}]


def test_bad_wait_in_a_posted_message_is_refused_and_stores_nothing(chat):
    """A POST's `wait` is a whole number of seconds from 0 to 20, and needs `after` (the page it waits
    for is the transcript past it): anything else is a 400 at once, which stores and holds nothing."""
    before = counts(chat.c)
    for wait in BAD_POST_WAIT:
        started = time.monotonic()
        assert_refused(chat.post(chat.messages, {"text": "what is 2fa?", "after": 0, "wait": wait}), 400,
                       "bad_wait", "whole number of seconds from 0 to 20")
        assert time.monotonic() - started < 0.5, wait
    assert_refused(chat.post(chat.messages, {"text": "what is 2fa?", "wait": 5}), 400, "bad_wait",
                   "wait needs after")
    assert counts(chat.c) == before
    assert chat.c.chat_waiters.waiting == 0


def test_good_after_param_pages_the_transcript(chat):
    """`after` omitted, 0, or past the end reads the greeting, the greeting, and nothing."""
    greeting = chat.client.get(chat.messages).get_json()["messages"]
    assert [m["sender"] for m in greeting] == ["bot"]
    assert chat.client.get(f"{chat.messages}?after=0").get_json()["messages"] == greeting
    assert chat.client.get(f"{chat.messages}?after={10**17}").get_json()["messages"] == []


def test_a_poll_reads_its_own_session_in_order_a_page_at_a_time(chat):
    """A poll returns up to MAX_PAGE of this session's messages after `after`, in order, with their
    buttons; never another session's, however the two interleave."""
    other = chat.client.post("/chat/api/sessions", json={"locale": "en"}).get_json()["session_id"]
    with chat.c.db.transaction() as s:
        for i in range(2 * MAX_PAGE + 10):
            s.add(ChatMessage(session_id=(chat.sid, other)[i % 2], sender="bot", text=f"m{i}",
                              buttons=[{"label": "Yes", "text": "Yes"}] if i == 4 else [],
                              created_at=chat.c.clock.now()))
    pages, after = [], 0
    while True:
        page = chat.client.get(f"{chat.messages}?after={after}").get_json()["messages"]
        if not page:
            break
        pages.append(page)
        after = page[-1]["seq"]
    read = [m for page in pages for m in page]
    assert [len(p) for p in pages] == [MAX_PAGE, 6]  # the greeting and 205 of the 410
    assert [m["text"] for m in read[1:]] == [f"m{i}" for i in range(0, 2 * MAX_PAGE + 10, 2)]
    assert [m["seq"] for m in read] == sorted({m["seq"] for m in read})
    assert read[3]["buttons"] == [{"label": "Yes", "text": "Yes"}] and read[2]["buttons"] == []


WRONG_METHODS = [("GET", "/chat/api/sessions", "POST"), ("PUT", "/chat/api/sessions", "POST"),
                 ("DELETE", "/chat/api/sessions", "POST"), ("PUT", "/chat/api/sessions/{sid}/messages", "GET"),
                 ("DELETE", "/chat/api/sessions/{sid}/messages", "POST"),
                 ("PATCH", "/chat/api/sessions/{sid}/messages", "POST")]
UNKNOWN_ROUTES = ["/chat/api/", "/chat/api/nope", "/chat/api/sessions/{sid}", "/chat/api/sessions/{sid}/messages/1",
                  "/chat/api/sessions/{sid}/typing", "/chat/api/sessions/..%2F..%2Fetc/messages"]


def test_wrong_method_is_405_json(chat):
    """A wrong method on a chat API route is a 405 in JSON whose Allow header lists what is allowed."""
    before = counts(chat.c)
    for method, path, allowed in WRONG_METHODS:
        r = chat.client.open(path.format(sid=chat.sid), method=method, json={"text": "hi"})
        assert_refused(r, 405, "method_not_allowed", "not allowed")
        assert allowed in r.headers.get("Allow", ""), (method, path, r.headers)
    assert counts(chat.c) == before


def test_unknown_chat_api_route_is_404_json(chat):
    """An unknown route under /chat/api/ is a 404 in JSON, not an HTML page."""
    for path in UNKNOWN_ROUTES:
        for method in ("GET", "POST"):
            assert_refused(chat.client.open(path.format(sid=chat.sid), method=method, json={}), 404,
                           "not_found", "not found")


# ---- link pages ----------------------------------------------------------------------------------------

BAD_TOKENS = ["nope", "A" * 43, "%00", "a%20b", "x" * 500, "%E4%B8%AD"]


def test_bad_link_tokens_show_the_link_error_page(chat):
    """An unknown enroll or cancel token shows the 404 link error page on GET and POST, and changes nothing."""
    before = counts(chat.c)
    for kind in ("enroll", "cancel"):
        for token in BAD_TOKENS:
            for method in ("GET", "POST"):
                r = chat.client.open(f"/{kind}/{token}", method=method, data={"step": "start", "password": "x"})
                assert (r.status_code, r.mimetype) == (404, "text/html"), (kind, token, method)
                page = r.get_data(as_text=True)
                assert "This link can't be used" in page and "recognise this link" in page
                assert "<form" not in page
                assert r.headers["Cache-Control"] == "no-store" and r.headers["Referrer-Policy"] == "no-referrer"
    assert counts(chat.c) == before


def _enroll_link(chat: Chat) -> tuple[str, str]:
    """Drive alex@example.com's case through the domain to link_sent; returns (case id, enroll path)."""
    c = chat.c
    load_demo(c)
    case_id = awaiting_case(c, "alex@example.com", conversation_key=f"webchat:{chat.sid}")
    c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
    c.worker.drain()
    link = link_in(last_mail(c, "enroll_link", case_id), "enroll")
    return case_id, "/enroll/" + link.rsplit("/enroll/", 1)[1]


def test_enroll_post_with_a_bad_step_changes_nothing(chat):
    """POST /enroll with an unknown or missing step, or confirm before the password, is refused and the
    link still works afterwards."""
    case_id, path = _enroll_link(chat)
    before = counts(chat.c)
    for form, status, phrase in (({"step": "bogus"}, 400, "That form can't be processed"),
                                 ({}, 400, "That form can't be processed"),
                                 ({"step": "START", "password": "correct horse battery"}, 400,
                                  "That form can't be processed"),
                                 ({"step": "confirm", "code": "123456"}, 409, "start again")):
        r = chat.client.post(path, data=form)
        assert r.status_code == status, (form, r.status_code)
        assert phrase in r.get_data(as_text=True) and "<form" not in r.get_data(as_text=True)
    assert counts(chat.c) == before
    with chat.c.recovery.service() as svc:
        case = svc.get(case_id)
        assert case.state == "link_sent" and case.link_failures == 0
    still = chat.client.get(path)
    assert still.status_code == 200 and 'name="password"' in still.get_data(as_text=True)


# ---- property: nothing a client sends is a 500 ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
text_fields = st.fixed_dictionaries(
    {"text": st.one_of(st.text(max_size=MAX_TEXT + 20), st.text(min_size=MAX_TEXT - 2, max_size=MAX_TEXT + 2),
                       json_values)},
    optional={"client_id": st.one_of(st.text(max_size=110), json_values),
              "locale": st.one_of(st.sampled_from(["en", "zh-TW", "zh", "", "fr-CA"]), st.text(max_size=10),
                                  json_values)})
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    text_fields.map(lambda v: json.dumps(v).encode()),
    text_fields.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""])
EXAMPLES = 1000


def test_no_body_makes_the_chat_api_fail(chat):
    """For 1,000 generated bodies (bytes, JSON values, text fields) neither chat POST route answers 5xx."""
    tried = []
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(body=bodies, content_type=content_types)
    def post_anything(body: bytes, content_type: str):
        tried.append(body)
        for path in (chat.messages, "/chat/api/sessions"):
            r = chat.post(path, body, content_type=content_type)
            assert r.status_code < 500, (path, body[:200], r.get_data(as_text=True)[:300])
            assert r.status_code in (201, 202, 400, 413), (path, r.status_code, body[:200])
            if r.status_code >= 400:
                problem = r.get_json()
                assert problem["error"] and problem["message"], problem

    post_anything()
    assert len(tried) >= EXAMPLES, f"only {len(tried)} bodies were generated"
    assert time.monotonic() - started < 60


def test_client_ip_behind_a_trusted_proxy(make_container, sqlite_url):
    """Per-IP limits count the client: X-Forwarded-For is used only with TRUSTED_PROXIES set."""
    from sqlalchemy import select

    from bot.web import create_app
    from recovery.models import InboxEvent

    for hops, forwarded, expected in ((0, "203.0.113.7", "127.0.0.1"), (1, "203.0.113.7", "203.0.113.7")):
        c = make_container(sqlite_url, TRUSTED_PROXIES=str(hops))
        client = create_app(c).test_client()
        sid = client.post("/chat/api/sessions", json={}).get_json()["session_id"]
        r = client.post(f"/chat/api/sessions/{sid}/messages", json={"text": "hello"},
                        headers={"X-Forwarded-For": forwarded}, environ_base={"REMOTE_ADDR": "127.0.0.1"})
        assert r.status_code == 202
        with c.db.transaction() as s:
            ips = [e.payload["ip"] for e in s.scalars(select(InboxEvent).order_by(InboxEvent.id))]
        assert ips[-1] == expected
