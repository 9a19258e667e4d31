"""No body makes the Intercom webhook answer 500: a property test over thousands of generated requests,
signed and unsigned, from random bytes and JSON to mutations of the documented payloads."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from bot.web import create_app
from recovery.models import InboxEvent
from tests.intercom_api import CLIENT_SECRET, FakeIntercom, fixture, settings_for, sign

EXAMPLES = 2000
FIXTURES = [fixture(n) for n in ("conversation.user.created", "conversation.user.replied",
                                 "conversation.user.replied.attachment", "conversation.user.replied.plain",
                                 "conversation.admin.replied", "ping")]
for _part in FIXTURES[2]["data"]["item"]["conversation_parts"]["conversation_parts"]:
    for _file in _part["attachments"]:
        _file["url"] = "http://127.0.0.1:9/upload.png"  # nothing listens there: no download leaves the host
TOPICS = ["conversation.user.created", "conversation.user.replied", "conversation.admin.replied", "ping",
          "conversation.admin.closed", "", "CONVERSATION.USER.CREATED"]
MARKUP = st.lists(st.sampled_from(list("<>/&;#!-=\"' pbrax\n\x00é字") +
                                  ["<p>", "</p>", "<br>", "&amp;", "&#", "&#xD800;", "<!--", "<![CDATA[",
                                   "\ud800", "<script>", "<img src=x>"]), max_size=30).map("".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | MARKUP | st.sampled_from(["../../admins", "1/2", "x" * 70, "147", 147, -1, 10 ** 30, "upload"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@st.composite
def near_real(draw) -> dict:
    """A documented payload with a few fields replaced, removed or retyped, and a handled topic mostly."""
    event = copy.deepcopy(draw(st.sampled_from(FIXTURES)))
    event["topic"] = draw(st.sampled_from(TOPICS[:2] * 4 + TOPICS))  # handled topics mostly
    event["id"] = f"notif_{draw(st.integers(0, 10 ** 9))}"  # mostly new deliveries, so most get stored
    item = event["data"]["item"]
    for part in [item.get("source")] + (item.get("conversation_parts") or {}).get("conversation_parts", []):
        if isinstance(part, dict):
            part["id"] = str(draw(st.integers(0, 10 ** 9)))
    paths = [p for p in _paths(event) if p]
    for path in draw(st.lists(st.sampled_from(paths), max_size=3)):
        parent = event
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or retyped the way there
    return event


def _encode(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(_encode),
    near_real().map(_encode),
    near_real().map(lambda e: _encode(e)[: len(_encode(e)) // 2]),  # cut off mid-way
    near_real().map(lambda e: json.dumps(e).encode("utf-16")),
)
signatures = st.sampled_from(["valid", "valid", "valid", "missing", "other-secret", "garbage", "non-ascii"])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from bot.wiring import build
    from recovery import db as dbmod
    from recovery.config import load_settings
    from tests.conftest import SECRET

    api = FakeIntercom()
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'bot.db'}"
    dbmod.upgrade(url)
    container = build(load_settings(DATABASE_URL=url, SECRET_KEY=SECRET, **settings_for(api)))
    yield container, create_app(container).test_client(), api
    container.close()
    api.close()


def stored(container) -> int:
    with container.db.transaction() as s:
        return s.scalar(select(func.count(InboxEvent.id)))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(body=bodies, how=signatures, content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_no_body_gets_a_500(client, body, how, content_type):
    """Whatever the body and signature, the answer is 200, 400 or 401, and only signed JSON is stored."""
    container, http, _ = client
    headers = {"valid": {"X-Hub-Signature": sign(body)}, "missing": {},
               "other-secret": {"X-Hub-Signature": sign(body, CLIENT_SECRET + "x")},
               "garbage": {"X-Hub-Signature": "sha1=" + body[:20].hex()},
               "non-ascii": {"X-Hub-Signature": "sha1=\xe9\xff"}}[how]
    before = stored(container)
    r = http.post("/webhooks/intercom", data=body, headers=headers, content_type=content_type)
    assert r.status_code in (200, 400, 401), (r.status_code, r.get_data(as_text=True)[:300])
    event(f"{r.status_code} {(r.get_json() or {}).get('status') or (r.get_json() or {}).get('error')}")
    if how != "valid":
        assert r.status_code == 401
    if r.status_code != 200 or r.get_json()["status"] != "stored":
        assert stored(container) == before


def test_stored_events_are_processed_without_errors(client):
    """The events the property test got stored (it runs first) all go through the worker: none fails."""
    container, _, api = client
    assert stored(container) > 50
    container.worker.drain(max_passes=1000)
    with container.db.transaction() as s:
        failed = s.scalars(select(InboxEvent.last_error).where(InboxEvent.last_error.is_not(None))).all()
        waiting = s.scalar(select(func.count(InboxEvent.id)).where(InboxEvent.processed_at.is_(None)))
    assert failed == [] and waiting == 0
    assert api.replies(), "the worker answered through the fake Intercom API"
