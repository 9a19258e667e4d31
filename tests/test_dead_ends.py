"""Every stage of the conversation has a way out, driven through the web chat's HTTP API as a customer
would: a mistyped email, a reload, the real owner disputing a request from a chat of their own, a code
typed after a lock; plus the stage table itself and the Slack card's layout."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import requests
from sqlalchemy import select

from bot.slack import card
from bot.templates import LOCALES
from recovery import router, stages
from recovery.clock import ManualClock
from recovery.dialog import RESEND, Dialog, Incoming
from recovery.models import Case, Conversation, OutboxMessage
from recovery.stages import EXITS, IllegalMove, Stage
from tests.conftest import ChatClient, code_in, link_in
from tests.helpers import account, awaiting_case, last_mail, load_accounts

ALEX_ID, ALEX = "acct-1001", "alex@example.com"
MEI_ID, MEI = "acct-1002", "mei@example.com"


@pytest.fixture
def server(sqlite_url, live):
    s = live(sqlite_url, worker=False, clock=ManualClock(datetime.now(timezone.utc).replace(microsecond=0)))
    load_accounts(s.container, [account(ALEX_ID, ALEX), account(MEI_ID, MEI)])
    return s


def turn(chat: ChatClient, c, text: str) -> list[dict]:
    """Send one message, let the worker run, return the bot's replies (text and buttons)."""
    chat.say(text)
    c.worker.drain()
    return [m for m in chat.poll() if m["sender"] == "bot"]


def shown(c, reply: dict) -> list[str]:
    return [b["label"] for b in reply["buttons"]]


def cases(c) -> list[Case]:
    with c.db.transaction() as s:
        return list(s.scalars(select(Case).order_by(Case.created_at, Case.id)))


def test_a_mistyped_email_is_not_a_trap(server):
    """After a mistyped address the code step offers a different email and cancel as buttons; the right
    address typed there (or after the button) starts over with it, the wrong one's case stops, and a
    conversation may try only a few addresses."""
    c = server.container
    chat = ChatClient(server.url)
    turn(chat, c, "I lost my authenticator")
    [sent] = turn(chat, c, "alex@exmaple.com")  # a typo: a stand-in case, the same words as a real one
    assert "6-digit verification code" in sent["text"]
    with c.db.transaction() as s:  # the stand-in's emails were built like real ones, at the first try
        assert {(m.status, m.attempts) for m in s.scalars(select(OutboxMessage))} == {("sent", 1)}
    assert shown(c, sent) == [c.renderer.button(k, "en") for k in EXITS[Stage.AWAIT_CODE]]
    [reminder] = turn(chat, c, "I lost my authenticator")
    assert reminder["text"] == c.renderer.chat("ask_code", "en") and "Use a different email" in shown(c, reminder)

    replies = turn(chat, c, ALEX)  # the right address, typed at the code step
    assert [r["text"] for r in replies][-1].startswith("If that address belongs to")
    first, second = sorted(cases(c), key=lambda case: case.account_id is not None)
    assert (first.state, first.account_id) == ("cancelled", None)
    assert (second.state, second.account_id) == ("verifying", ALEX_ID)
    code = code_in(last_mail(c, "verification_code", second.id))
    assert "first deposit" in turn(chat, c, code)[-1]["text"]

    other = ChatClient(server.url)  # the button, then the limit of addresses per conversation
    turn(other, c, "I lost my authenticator")
    turn(other, c, "nobody@example.net")
    asked = turn(other, c, "Use a different email")
    assert asked[-1]["text"] == c.renderer.chat("ask_other_email", "en", {"brand_name": "Exchange"})
    turn(other, c, "nobody2@example.net")
    turn(other, c, "nobody3@example.net")
    [limit] = turn(other, c, "nobody4@example.net")
    assert "only 3 email addresses" in limit["text"] and shown(c, limit)[0] == "Talk to a person"
    assert sum(1 for case in cases(c) if case.conversation_id == f"webchat:{other.session_id}") == 3


def test_a_reload_continues_the_same_conversation(server):
    """A page that reloads with its stored session id gets the whole transcript back from the API and
    carries on with the same case: no second start, no stand-in case."""
    c = server.container
    chat = ChatClient(server.url)
    turn(chat, c, "I lost my authenticator")
    turn(chat, c, ALEX)
    reloaded = requests.get(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                            params={"after": 0}, timeout=10).json()["messages"]
    assert [m["seq"] for m in reloaded] == [m["seq"] for m in chat.seen]
    assert reloaded[-1]["text"].startswith("If that address belongs to") and reloaded[-1]["buttons"]
    (case,) = cases(c)
    assert "first deposit" in turn(chat, c, code_in(last_mail(c, "verification_code", case.id)))[-1]["text"]
    assert len(cases(c)) == 1


def test_the_owner_disputing_from_another_chat_is_pointed_to_the_cancel_link(server):
    """The real owner, in a chat of their own, says it wasn't them and asks to cancel: they are never
    told there is no request, but pointed to the cancel link in the email to the address on file, which
    stops the case; a scam report that mentions an agent gets the scam answer, not a handover."""
    c = server.container
    attacker = ChatClient(server.url)
    turn(attacker, c, "I lost my authenticator")
    turn(attacker, c, ALEX)
    (case,) = cases(c)

    owner = ChatClient(server.url)
    [dispute] = turn(owner, c, "It wasn't me")
    assert dispute["text"] == c.renderer.chat("dispute", "en", {"case_id": None})
    assert "Wasn't you? Cancel this request" in dispute["text"] and "registered on your account" in dispute["text"]
    for text in ("cancel", "cancel my request"):
        [answer] = turn(owner, c, text)
        assert "no open recovery request" not in answer["text"].lower()
        assert "Wasn't you? Cancel this request" in answer["text"]
    [scam] = turn(owner, c, "someone claiming to be your customer service agent asked for my 2fa code")
    assert scam["text"] == c.renderer.chat("safety", "en", {"brand_name": "Exchange",
                                                               "support_email": c.settings.SUPPORT_EMAIL})

    cancel = link_in(last_mail(c, "reset_requested", case.id), "cancel")
    assert requests.post(cancel, timeout=10).status_code == 200
    c.worker.drain()
    assert cases(c)[0].state == "cancelled"
    assert "cancelled" in [m for m in attacker.poll() if m["sender"] == "bot"][-1]["text"]


def test_a_code_after_a_lock_is_answered_consistently(server):
    """Once too many wrong codes lock the case, a code typed next is told why it no longer counts (the
    case is closed), not scolded for sending a code; starting again is offered."""
    c = server.container
    chat = ChatClient(server.url)
    turn(chat, c, "I lost my authenticator")
    turn(chat, c, ALEX)
    (case,) = cases(c)
    right = code_in(last_mail(c, "verification_code", case.id))
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(c.deps.policy.code_max_wrong):
        replies = turn(chat, c, wrong)
    assert cases(c)[0].state == "locked" and "locked" in replies[-1]["text"]
    [after] = turn(chat, c, right)
    assert after["text"] == c.renderer.chat("code_not_expected", "en", {"case_id": case.id})
    assert "Please don't send codes here" not in after["text"]
    assert shown(c, after)[0] == "I lost my authenticator"


def test_dispute_and_thanks_intents_through_the_dialog(make_container, sqlite_url):
    """The router's `dispute` and `thanks` intents, handed to the dialog as understood: a dispute in the
    chat that holds an open case offers to cancel it; thanks is answered without the greeting menu."""
    c = make_container(sqlite_url)
    load_accounts(c, [account(ALEX_ID, ALEX)])
    key = "intercom:5150"

    def act(intent: str | None, text: str = "", n: int = 0) -> dict:
        with c.db.transaction() as s:
            d = Dialog(s, c.deps)
            msg = Incoming(conversation_key=key, channel="intercom", text=text)
            d.intent(msg, intent, turn=f"t{n}") if intent else d.handle(msg, turn=f"t{n}")
        c.worker.drain()
        from tests.test_guidance import sent
        return sent(c, key)[-1]

    assert act("thanks", n=1)["message"] == "thanks" and act("thanks", n=1)["buttons"] == []
    assert act("dispute", n=2)["buttons"] == ["safety", "talk_to_person"]
    act(None, "I lost my authenticator", 3)
    act(None, ALEX, 4)
    disputed = act("dispute", n=5)
    (case,) = cases(c)
    assert disputed["context"]["case_id"] == case.id and disputed["buttons"][0] == "cancel_request"
    thanked = act("thanks", n=6)
    assert thanked["context"]["case_id"] == case.id
    assert case.id in c.renderer.chat("thanks", "zh-TW", thanked["context"])


def test_the_stage_table_refuses_illegal_moves_and_every_stage_has_a_way_out():
    """A move the table does not allow raises and changes nothing; every stage offers a person, and every
    stage with an open case offers to cancel it."""
    conv = Conversation(key="x", channel="webchat", locale="en", stage="waiting", data={})
    with pytest.raises(IllegalMove):
        stages.move(conv, "code_passed")
    assert conv.stage == "waiting"
    assert stages.move(conv, "case_ended") == Stage.IDLE
    assert set(EXITS) == set(Stage)
    assert all("talk_to_person" in exits for exits in EXITS.values())
    assert all("cancel_request" in EXITS[s] for s in (Stage.AWAIT_CODE, Stage.AWAIT_FACT, Stage.WAITING))
    assert "different_email" in EXITS[Stage.AWAIT_CODE] and "start_over" in EXITS[Stage.AWAIT_EMAIL]
    assert "stateDiagram-v2" in stages.mermaid() and "await_code --> await_email: change_email" in stages.mermaid()


@pytest.mark.parametrize("locale", LOCALES)
def test_every_exit_button_label_leads_where_it_says(locale):
    """Each way-out button's label, in every language, comes back as the action or intent it stands for."""
    from bot.templates import Renderer
    r = Renderer(globals={"brand_name": "B", "support_email": "s@b"})
    label = lambda key: r.button(key, locale)  # noqa: E731
    assert stages.action(label("start_over")) == "start_over"
    assert stages.action(label("different_email")) == "different_email"
    assert stages.action(label("dispute")) == "dispute"
    assert router.command(label("cancel_request")) == "cancel"
    assert router.command(label("talk_to_person")) == "talk_to_person"
    assert router.command(label("case_status")) == "case_status"
    assert RESEND.search(label("resend_code")) and stages.action(label("resend_code")) is None
    assert router.route(label("lost_authenticator")).intent == "start_recovery"
    assert stages.action("my email is wrong, it was not me who typed it") is None  # anchored: only the label


def test_the_slack_card_puts_each_fact_on_its_own_line(make_container, sqlite_url):
    """The card's risk section has the level and the approval rule on separate lines, each check is a line
    of its own, and a web chat's missing login reads as neutral, not as a failure."""
    c = make_container(sqlite_url)
    load_accounts(c, [account(ALEX_ID, ALEX)])
    case_id = awaiting_case(c, ALEX)
    with c.db.transaction() as s:
        data = card.render(c.renderer, s, c.deps, s.get(Case, case_id))
    sections = [b["text"]["text"] for b in data.blocks if b["type"] == "section"]
    risk = next(t for t in sections if t.startswith("*Risk"))
    assert risk.splitlines() == ["*Risk: LOW* (not logged in)",
                                 "Needs 1 approval · notice window 0 h · withdrawal hold 24 h"]
    checks = next(t for t in sections if t.startswith("*Checks*")).splitlines()
    assert checks[0] == "*Checks*" and len(checks) == 4
    assert checks[1].startswith(":white_circle: *verified session*: neutral")
    assert checks[2].startswith(":white_check_mark: *email code*: pass")
    assert checks[3].startswith(":white_check_mark: *account facts*: pass")
    summary = next(t for t in sections if t.startswith("*Case*")).splitlines()
    assert len(summary) == 2 and summary[1].startswith("*Opened*")
    assert not any(":x:" in t for t in sections)


def test_the_scripted_recovery_stays_within_the_effort_target():
    """benchmarks/customer_effort.py's scripted recovery, in Traditional Chinese, completes in at most
    5 messages, 1 link opened and 2 form submits (the benchmark runs both languages)."""
    from benchmarks.customer_effort import TARGET, recover
    effort = recover("zh-TW")
    assert (effort.messages, effort.links, effort.submits) == (5, 1, 2)
    assert effort.over_target() == [] and TARGET == {"messages": 5, "links": 1, "submits": 2}
