"""A first look at the Slack approval flow: card posted, approve modal, decision, card updated."""
from __future__ import annotations

import pytest
import requests

from recovery.clock import ManualClock
from tests.helpers import load_demo
from tests.slack_api import SIGNING_SECRET, FakeSlack, button_click, signed, submission
from tests.test_security import awaiting_case


@pytest.fixture
def slack():
    fake = FakeSlack()
    yield fake
    fake.close()


def test_card_approve_and_update(sqlite_url, live, slack):
    """An awaiting case gets a card; an approver's click opens a modal whose submission approves and re-renders the card."""
    server = live(sqlite_url, worker=False, clock=ManualClock(), SLACK_BOT_TOKEN="xoxb-test",
                  SLACK_SIGNING_SECRET=SIGNING_SECRET, SLACK_APPROVAL_CHANNEL="C0APPROVE",
                  SLACK_APPROVER_IDS="UALICE,UBOB", SLACK_SECURITY_APPROVER_IDS="UCAROL", SLACK_API_URL=slack.url)
    c = server.container
    load_demo(c)
    case_id = awaiting_case(c, "alex@example.com")
    c.worker.drain()
    (post,) = slack.wait_for("chat.postMessage")
    assert post["channel"] == "C0APPROVE" and case_id in str(post["blocks"])
    body = button_click("approve_case", case_id=case_id, channel="C0APPROVE", message_ts="1700000001.000100",
                        user="UALICE")
    r = requests.post(f"{server.url}/slack/events", data=body, headers=signed(body), timeout=10)
    assert r.status_code == 200
    (opened,) = slack.wait_for("views.open")
    view = opened["view"]
    body = submission(view, user="UALICE")
    r = requests.post(f"{server.url}/slack/events", data=body, headers=signed(body), timeout=10)
    assert r.status_code == 200, r.text
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "approved"
    c.worker.drain()
    (update,) = slack.wait_for("chat.update")
    assert "UALICE" in str(update["blocks"]) and "approve_case" not in str(update["blocks"])
