"""Slack requests that are signed but not what an approver in our own workspace sends (issue 7).

Same rig as tests/test_slack.py: a live app whose Slack Web API is a local fake, every request really
signed. Here: users of other workspaces in a shared channel, Enterprise Grid organisations, a step-up modal
without its code field, a form sent as JSON, and thousands of generated signed bodies, none of which may get
a 5xx or change anything.
"""
from __future__ import annotations

import copy
import json
import random
import time
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import func, select

from recovery.models import Approval, AuditRecord, Case, Conversation, InboxEvent, OutboxMessage
from tests.helpers import awaiting_case, get_case
from tests.slack_api import TEAM, button_click, interaction, signed, slash, submission
from tests.test_security import ALEX, approvals, enroll_approver, snapshot
from tests.test_slack import ALICE, BOB, CHANNEL, OTHER_TEAM, refusals, rig, slack  # noqa: F401 - fixtures

ENTERPRISE, OTHER_ENTERPRISE = "E0OURORG", "E0ELSEWHERE"


def edited(body: str, edit) -> str:
    """An interaction body with its payload changed by `edit(payload)`."""
    payload = json.loads(dict(parse_qsl(body))["payload"])
    edit(payload)
    return interaction(payload)


def test_a_listed_user_from_another_workspace_in_a_shared_channel_is_refused(any_db_url, rig):
    """In a Slack Connect channel `team.id` is ours but the clicking user's `user.team_id` is theirs: an
    approver's id from there gets no modal, their forged submission changes nothing, and both are audited."""
    r = rig(any_db_url)
    case_id = awaiting_case(r.c, ALEX)
    view = r.modal(case_id, ALICE)
    before = snapshot(r.c, case_id)
    channel, ts = r.card(case_id)
    foreign = lambda p: p["user"].update(team_id=OTHER_TEAM)  # noqa: E731
    click = edited(button_click("approve_case", case_id=case_id, channel=channel, message_ts=ts, user=BOB), foreign)
    assert r.post(click).status_code == 200
    r.post(edited(submission(view, user=BOB), foreign))
    r.fake.wait_for("chat.postEphemeral", 2)
    assert len(r.fake.named("views.open")) == 1  # only Alice's own, above
    assert snapshot(r.c, case_id) == before
    assert [reason for _, reason in refusals(r.c, case_id)] == ["other_team", "other_team"]
    assert all("exchange's own workspace" in t for t in r.ephemerals(BOB))


def test_with_an_enterprise_id_set_other_or_missing_organisations_are_refused(any_db_url, rig):
    """With SLACK_ENTERPRISE_ID set, a click that names another organisation, or none, is refused; one that
    names ours opens the modal."""
    r = rig(any_db_url, SLACK_ENTERPRISE_ID=ENTERPRISE)
    case_id = awaiting_case(r.c, ALEX)
    channel, ts = r.card(case_id)
    base = button_click("approve_case", case_id=case_id, channel=channel, message_ts=ts, user=ALICE)
    r.post(base)
    r.post(edited(base, lambda p: p.update(enterprise={"id": OTHER_ENTERPRISE, "name": "x"})))
    r.post(edited(base, lambda p: p.update(enterprise={"id": ENTERPRISE}) or p["user"].update(
        enterprise_id=OTHER_ENTERPRISE)))
    r.fake.wait_for("chat.postEphemeral", 3)
    assert r.fake.named("views.open") == []
    r.post(edited(base, lambda p: p.update(enterprise={"id": ENTERPRISE, "name": "ours"})))
    r.fake.wait_for("views.open")
    assert [reason for _, reason in refusals(r.c, case_id)] == ["other_team"] * 3


def test_a_step_up_modal_without_its_code_field_is_refused_with_a_way_forward(any_db_url, rig):
    """A submission for a case that needs step-up but carries no code field (a modal opened before policy
    asked for one) changes nothing; the approver is told why and to click Approve again, and the modal that
    click opens has the code field."""
    r = rig(any_db_url, RISK_POLICY='{"levels": {"low": {"step_up": true}}}')
    case_id = awaiting_case(r.c, ALEX)
    enroll_approver(r.c, ALICE)
    view = r.modal(case_id, ALICE)
    stripped = dict(view, blocks=[b for b in view["blocks"] if b.get("block_id") != "totp"])
    before = snapshot(r.c, case_id)
    resp = r.post(submission(stripped, user=ALICE, values={}))
    assert resp.status_code == 200 and resp.json()["response_action"] == "update"  # "recording…"
    r.decide()
    (told,) = r.ephemerals(ALICE)
    assert "current code from your own authenticator" in told and "Click Approve on the card again" in told
    assert snapshot(r.c, case_id) == before
    assert "totp" in {b.get("block_id") for b in r.modal(case_id, ALICE)["blocks"]}  # the new form asks for it


def test_a_signed_form_sent_as_json_is_a_bad_request_that_changes_nothing(any_db_url, rig):
    """A correctly signed form body labelled application/json gets 400 with a reason, not a 500."""
    r = rig(any_db_url)
    case_id = awaiting_case(r.c, ALEX)
    body = submission(r.modal(case_id, ALICE), user=ALICE)
    before = snapshot(r.c, case_id)
    resp = r.post(body, headers=signed(body, content_type="application/json"))
    assert resp.status_code == 400 and resp.json()["error"] == "bad_body"
    assert snapshot(r.c, case_id) == before and approvals(r.c, case_id) == []


# ---- generated signed bodies ----------------------------------------------------------------------------

ODD_VALUES = [None, 0, -1, 1.5, True, False, "", "x" * 3000, [], {}, [1, "a"], {"id": 5}, {"id": None},
              "\u202e\u0000", "RC-NOSUCH01", "<!channel>", {"values": []}, [{"action_id": 1}], "9" * 40]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _mutate(payload, rnd: random.Random):
    for _ in range(rnd.randint(1, 3)):
        paths = [p for p in _paths(payload) if p]
        if not paths:
            break
        *parents, key = rnd.choice(paths)
        parent = payload
        for step in parents:
            parent = parent[step]
        if rnd.random() < 0.2 and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = copy.deepcopy(rnd.choice(ODD_VALUES))
    return payload


def generated_bodies(bases: list[str], n: int, seed: int = 7) -> list[tuple[str, str]]:
    """(body, content type) pairs: real bodies with random fields replaced, deleted or retyped, re-encoded
    in odd ways, and some that are not Slack bodies at all."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        base = rnd.choice(bases)
        content_type = rnd.choice(["application/x-www-form-urlencoded"] * 6 + ["application/json", "text/plain", ""])
        fields = dict(parse_qsl(base, keep_blank_values=True))
        kind = rnd.random()
        if "payload" in fields and kind < 0.75:
            payload = _mutate(json.loads(fields["payload"]), rnd)
            if rnd.random() < 0.1:
                payload = rnd.choice([[payload], "text", 7, None])
            body = interaction(payload) if rnd.random() < 0.8 else json.dumps(payload)
        elif kind < 0.85:
            key = rnd.choice(list(fields))
            fields[key] = str(rnd.choice(ODD_VALUES))
            if rnd.random() < 0.3:
                fields["payload"] = rnd.choice(["{", "[]", "null", '{"type": 1}', "payload"])
            body = urlencode(fields)
        else:
            body = rnd.choice(['{"type": "url_verification", "challenge": 5}', '{"type": "event_callback", "event": 1}',
                               "{", "[" * 5000, '{"type": "url_verification"}', "payload=%ZZ", "payload=",
                               '{"team": [], "user": "x", "authorizations": [1]}', "&&&", "a=" + "%" * 50,
                               json.dumps({"type": "block_actions", "enterprise": 3, "is_enterprise_install": []})])
        out.append((body, content_type))
    return out


def test_thousands_of_signed_malformed_bodies_get_no_5xx_and_change_nothing(sqlite_url, rig):
    """5,000 generated bodies, each correctly signed, are answered below 500; once the worker has decided the
    submissions that were stored, no case, approval, audit record or conversation was added or changed, no
    event failed, and the only messages queued tell an approver that no such case exists."""
    r = rig(sqlite_url)
    case_id = awaiting_case(r.c, ALEX)
    view = r.modal(case_id, ALICE)
    channel, _ = r.card(case_id)
    unknown_case = dict(view, private_metadata=f"RC-NOSUCH01|{channel}")
    bases = [button_click("approve_case", case_id=case_id, channel=channel, message_ts="1.000", user=ALICE),
             button_click("deny_case", case_id=case_id, channel="C0OTHER", message_ts="2.000", user=BOB),
             submission(unknown_case, user=ALICE, values={"totp": {"code": {"type": "plain_text_input", "value": "1"}}}),
             submission(dict(unknown_case, callback_id="deny_modal"), user=BOB,
                        values={"reason": {"text": {"type": "plain_text_input", "value": "no"}}}),
             slash("pending", user=ALICE), slash("RC-NOSUCH01", user=BOB, team=TEAM)]

    def state() -> tuple:
        with r.c.db.transaction() as s:
            return (tuple(s.execute(select(Case.id, Case.state, Case.version)).all()),
                    s.scalar(select(func.count(Approval.id))), s.scalar(select(func.count(AuditRecord.id))),
                    s.scalar(select(func.count()).select_from(Conversation)),
                    s.scalar(select(func.count(OutboxMessage.id)).where(OutboxMessage.kind != "slack")))

    before = state()
    client = r.server.app.test_client()
    statuses: dict[int, int] = {}
    for body, content_type in generated_bodies(bases, 5000):
        headers = signed(body, content_type=content_type or "application/x-www-form-urlencoded")
        if not content_type:
            headers.pop("Content-Type")
        status = client.post("/slack/events", data=body.encode(), headers=headers).status_code
        statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) == 5000
    assert not [s for s in statuses if s >= 500], statuses
    assert statuses.get(400, 0) > 1000  # most bodies are refused by the gate, with a reason
    time.sleep(0.3)  # listeners acked early finish their Slack calls
    clicks_told = len(r.fake.named("chat.postEphemeral"))
    r.decide()
    assert state() == before
    with r.c.db.transaction() as s:
        stored = s.scalars(select(InboxEvent).where(InboxEvent.source == "slack")).all()
        assert stored and all(e.processed_at is not None and e.attempts == 0 for e in stored)
    told = r.fake.named("chat.postEphemeral")[clicks_told:]
    assert told and all("RC-NOSUCH01" in t["text"] and "not found" in t["text"] for t in told)
    assert get_case(r.c, case_id).state == "awaiting_approval" and approvals(r.c, case_id) == []
