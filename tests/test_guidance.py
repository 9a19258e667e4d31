"""2FA guidance and the conversation around it, end to end through the web chat (Intercom renders the same
message keys with the same templates): every topic in both languages, the customer's language, clarifying
questions, handovers, and a case's status across conversations."""
from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from sqlalchemy import func, select

from bot.templates import LOCALES
from recovery import router
from recovery.clock import ManualClock
from recovery.dialog import BUTTON, FOLLOW_UPS, Dialog, Incoming
from recovery.models import Case, ChatMessage, Conversation, OutboxMessage
from tests.conftest import ChatClient
from tests.helpers import account, load_accounts

BRAND, SUPPORT = "Acme Exchange", "help@acme.test"
# Hold durations are policy, not template text: 12 hours at low risk, up to 10 days at high risk.
POLICY = '{"levels": {"low": {"hold_hours": 12}, "high": {"hold_hours": 240}}}'
ALEX_ID, ALEX = "acct-1001", "alex@example.com"
CJK = re.compile(r"[\u3400-\u9fff]")


def manual_clock() -> ManualClock:
    return ManualClock(datetime.now(timezone.utc).replace(microsecond=0))


@pytest.fixture
def server(sqlite_url, live):
    return live(sqlite_url, worker=False, clock=manual_clock(), BRAND_NAME=BRAND, SUPPORT_EMAIL=SUPPORT,
                RISK_POLICY=POLICY)


def turn(chat: ChatClient, c, text: str) -> list[dict]:
    """Send one message, let the worker run, return the bot's replies (text and buttons)."""
    chat.say(text)
    c.worker.drain()
    return [m for m in chat.poll() if m["sender"] == "bot"]


def labels(c, message: dict, locale: str, keys) -> tuple[list[str], list[str]]:
    return [b["label"] for b in message["buttons"]], [c.renderer.button(k, locale) for k in keys]


def sent(c, conversation: str, message: str | None = None) -> list[dict]:
    """Chat messages the dialog queued for a conversation (decrypted outbox payloads), oldest first."""
    with c.db.transaction() as s:
        rows = s.scalars(select(OutboxMessage).where(OutboxMessage.kind == "chat").order_by(OutboxMessage.id))
        payloads = [c.keyring.decrypt_json(r.payload_enc) for r in rows]
    return [p for p in payloads if p["conversation"] == conversation and message in (None, p["message"])]


def transcript_keys(c, chat: ChatClient) -> list[str]:
    """The message keys of the bot's lines in a web chat transcript after the greeting, oldest first."""
    with c.db.transaction() as s:
        return list(s.scalars(select(ChatMessage.message_key).where(
            ChatMessage.session_id == chat.session_id, ChatMessage.sender == "bot",
            ChatMessage.message_key.is_not(None)).order_by(ChatMessage.seq)))


def open_case_in_chat(chat: ChatClient, c) -> str:
    load_accounts(c, [account(ALEX_ID, ALEX)])
    turn(chat, c, "I lost my authenticator")
    turn(chat, c, ALEX)
    with c.db.transaction() as s:
        return s.get(Conversation, f"webchat:{chat.session_id}").case_id


@pytest.mark.parametrize("locale", LOCALES)
def test_every_guidance_topic_is_answered_in_both_languages(server, locale):
    """Each topic's button gets its templated answer in the chat's language, with brand, support email and
    hold hours from settings and policy, and the topic's follow-up buttons."""
    c = server.container
    chat = ChatClient(server.url, locale=locale)
    for topic in router.TOPICS:
        replies = turn(chat, c, c.renderer.button(BUTTON[topic], locale))
        assert len(replies) == 1, (topic, replies)
        text = replies[0]["text"]
        assert text == c.renderer.chat(topic, locale, {"hold_hours_min": 12, "hold_hours_max": 240})
        assert bool(CJK.search(text)) == (locale == "zh-TW"), topic
        shown, follow_ups = labels(c, replies[0], locale, FOLLOW_UPS[topic])
        assert shown == follow_ups, topic
        if topic in ("why_2fa", "enable_2fa", "code_rejected", "new_phone", "safety"):
            assert BRAND in text, topic
    by_topic = {t: c.renderer.chat(t, locale, {"hold_hours_min": 12, "hold_hours_max": 240})
                for t in router.TOPICS}
    assert SUPPORT in by_topic["safety"]
    assert ("12 hours" in by_topic["lost_access"] and "10 days" in by_topic["lost_access"]) or (
        "12 小時" in by_topic["lost_access"] and "10 天" in by_topic["lost_access"])
    assert all(word in by_topic["why_2fa"].lower() for word in ("log in", "bank account", "external wallet")) \
        or all(word in by_topic["why_2fa"] for word in ("登入", "銀行帳戶", "外部錢包"))


def test_guidance_content_is_right_for_totp():
    """The answers name what TOTP users actually trip over: clock drift, the wrong entry, a late code, moving
    while the old phone works, the setup key kept offline, cloud sync off, and who never asks for what."""
    from bot.templates import Renderer
    r = Renderer(globals={"brand_name": BRAND, "support_email": SUPPORT})
    en = {t: r.chat(t, "en", {"hold_hours_min": 24, "hold_hours_max": 168}) for t in router.TOPICS}
    assert "30 seconds" in en["what_is_2fa"] and "password" in en["what_is_2fa"]
    assert all(s in en["code_rejected"] for s in ("automatic date and time", "wrong account", "30 seconds"))
    assert "while the old phone still works" in en["new_phone"]
    assert all(s in en["enable_2fa"] for s in ("setup key", "offline", "cloud sync", "Google Authenticator"))
    assert all(s in en["safety"] for s in ("never ask", "password", "2FA code", "recovery phrase"))
    assert "start a recovery" in en["lost_access"] and "24 hours" in en["lost_access"]
    zh = {t: r.chat(t, "zh-TW", {"hold_hours_min": 24, "hold_hours_max": 168}) for t in router.TOPICS}
    assert "自動設定日期與時間" in zh["code_rejected"] and "雲端同步" in zh["enable_2fa"]
    assert "絕不會" in zh["safety"] and "助記詞" in zh["safety"] and "7 天" in zh["lost_access"]


def test_free_text_questions_reach_their_topic(server):
    """Questions typed in the customer's own words, in either language or script, get the topic's answer."""
    c = server.container
    chat = ChatClient(server.url)
    asked = {"my google authenticator code keeps getting rejected": ("code_rejected", "en"),
             "換新手機了，驗證器要怎麼轉移？": ("new_phone", "zh-TW"),
             "what happens if my phone gets lost?": ("lost_access", "en"),
             "有人自稱客服要我的密碼": ("safety", "zh-TW"),
             "why do i need 2fa to add a bank account": ("why_2fa", "en")}
    for text, (topic, locale) in asked.items():
        replies = turn(chat, c, text)
        assert [m["text"] for m in replies] == [
            c.renderer.chat(topic, locale, {"hold_hours_min": 12, "hold_hours_max": 240})], text


def test_a_zh_tw_conversation_is_answered_in_zh_tw(server):
    """A customer writing Traditional Chinese gets every reply in Traditional Chinese, from the greeting to
    the emailed-code step, even in a chat that was opened in English."""
    c = server.container
    load_accounts(c, [account(ALEX_ID, ALEX)])
    for opened_in in ("zh-TW", "en"):
        chat = ChatClient(server.url, locale=opened_in)
        if opened_in == "zh-TW":
            assert CJK.search(chat.seen[0]["text"])
        replies = turn(chat, c, "我的手機不見了，沒辦法登入")
        assert [m["text"] for m in replies] == [c.renderer.chat("ask_email", "zh-TW")]
        replies = turn(chat, c, ALEX)
        assert "6 位數驗證碼" in replies[0]["text"]
        assert replies[0]["buttons"][0]["label"] == "重新寄送驗證碼"


def test_the_customer_can_switch_language_and_it_sticks(server):
    """'中文' switches an English chat to zh-TW for good, English words after it included; 'English'
    switches back."""
    c = server.container
    chat = ChatClient(server.url)
    assert [m["text"] for m in turn(chat, c, "中文")] == ["好的，我會用繁體中文回覆。"]
    replies = turn(chat, c, "what is 2fa")
    assert replies[0]["text"] == c.renderer.chat("what_is_2fa", "zh-TW")
    assert labels(c, replies[0], "zh-TW", FOLLOW_UPS["what_is_2fa"])[0] == ["為什麼需要 2FA？", "如何啟用 2FA？"]
    assert [m["text"] for m in turn(chat, c, "English please")] == ["OK, I'll reply in English."]
    assert turn(chat, c, "can you reply in chinese")[0]["text"] == "好的，我會用繁體中文回覆。"


def test_an_unclear_message_gets_a_clarifying_question_with_buttons(server):
    """Text that fits several intents is answered with a short question and the likely intents as buttons;
    tapping one carries on from there."""
    c = server.container
    chat = ChatClient(server.url)
    replies = turn(chat, c, "reset")
    assert [m["text"] for m in replies] == [c.renderer.chat("clarify", "en")]
    offered = [b["label"] for b in replies[0]["buttons"]]
    assert "I lost my authenticator" in offered and offered[-1] == "Talk to a person" and len(offered) >= 3
    assert "email address" in turn(chat, c, "I lost my authenticator")[0]["text"]


def test_unsure_twice_in_a_row_hands_over(server):
    """A second unclear message in a row emits the handover (reason bot_unsure); the web chat, with no people
    behind it, points to the support email."""
    c = server.container
    chat = ChatClient(server.url)
    assert turn(chat, c, "google")[0]["text"] == c.renderer.chat("clarify", "en")
    replies = turn(chat, c, "qwzx")
    assert len(replies) == 1 and SUPPORT in replies[0]["text"] and "no live agents" in replies[0]["text"]
    assert transcript_keys(c, chat) == ["clarify", "handover"]
    assert turn(chat, c, "hmm")[0]["text"] == c.renderer.chat("clarify", "en")  # the count starts again


def test_asking_for_a_person_hands_over_with_a_case_summary(server):
    """Mid-recovery, 'talk to a human' emits the handover (reason customer_asked) with the case's id, state,
    risk and checks, from which the staff note renders without any code or customer text. The web chat,
    with no people behind it, points to the support email; a channel with people gets the note."""
    c = server.container
    chat = ChatClient(server.url)
    case_id = open_case_in_chat(chat, c)
    replies = turn(chat, c, "I want to talk to a human")
    assert SUPPORT in replies[0]["text"] and case_id in replies[0]["text"]
    with c.db.transaction() as s:
        s.get(Case, case_id).conversation_id = "intercom:77"
        s.add(Conversation(key="intercom:77", channel="intercom", locale="en", stage="waiting", case_id=case_id,
                           data={}, created_at=c.clock.now(), updated_at=c.clock.now()))
    with c.db.transaction() as s:
        Dialog(s, c.deps).handle(Incoming(conversation_key="intercom:77", channel="intercom",
                                          text="I want to talk to a human"), turn="77")
    [handover] = sent(c, "intercom:77", "handover")
    context = handover["context"]
    assert (context["case_id"], context["state"], context["reason"]) == (case_id, "verifying", "customer_asked")
    assert {"name": "email_code", "result": "pending"} in context["checks"]
    note = c.renderer.chat("handover_note", "en", context)
    assert case_id in note and "state verifying" in note and "email_code pending" in note
    assert "asked for a person" in note and not re.search(r"\d{6}|https?://|@", note)
    with c.db.transaction() as s:
        assert s.scalar(select(Case.state).where(Case.id == case_id)) == "verifying"  # nothing changed


def test_status_of_my_case_answers_from_the_case_state(server):
    """'What's the status of my request?' is answered from the case's state, in the customer's language."""
    c = server.container
    chat = ChatClient(server.url)
    assert turn(chat, c, "what's the status of my request?")[0]["text"] == c.renderer.chat("no_case", "en")
    case_id = open_case_in_chat(chat, c)
    with c.db.transaction() as s:
        s.get(Case, case_id).state = "awaiting_approval"  # as after the checks (tested elsewhere)
        s.get(Conversation, f"webchat:{chat.session_id}").stage = "waiting"
    news = turn(chat, c, "any news on my request?")[0]["text"]
    assert news.startswith(f"Your request {case_id} is being reviewed by our security team. A decision usually "
                           "comes within 2 hours.")
    assert turn(chat, c, "審核進度如何")[0]["text"].startswith(f"您的申請 {case_id} 正由安全團隊審核中。")


def test_a_logged_in_customer_continues_their_open_case_in_a_new_conversation(make_container, sqlite_url):
    """A verified contact whose account has an open case is told about it in a new conversation, picks it
    up where it stood, and cannot open a second case from there."""
    c = make_container(sqlite_url, clock=manual_clock())
    load_accounts(c, [account(ALEX_ID, ALEX)])

    def say(conversation: str, text: str, n: int) -> None:
        with c.db.transaction() as s:
            Dialog(s, c.deps).handle(Incoming(conversation_key=conversation, channel="intercom", text=text,
                                              verified_account_id=ALEX_ID), turn=str(n))

    say("intercom:first", "I lost my authenticator", 1)
    say("intercom:first", ALEX, 2)
    say("intercom:second", "hi there", 3)
    assert [m["message"] for m in sent(c, "intercom:second")] == ["case_resumed", "ask_code"]
    say("intercom:second", "I lost my authenticator", 4)   # mid-flow: taken as a (missing) code, no new case
    say("intercom:second", "what's the status of my case?", 5)
    later = sent(c, "intercom:second")[2:]
    assert [(m["message"], m["context"].get("state")) for m in later] == [("ask_code", None),
                                                                          ("case_status", "verifying")]
    with c.db.transaction() as s:
        case = s.scalar(select(Case))
        assert s.scalar(select(func.count(Case.id))) == 1
        assert case.conversation_id == "intercom:second"  # the case's news now reaches this conversation
        assert s.get(Conversation, "intercom:second").case_id == case.id


def test_a_case_is_cancelled_only_on_an_unmistakable_request(server):
    """A sentence the router reads as 'cancel' gets a confirmation button; only the button (or a plain
    'cancel') cancels the case."""
    c = server.container
    chat = ChatClient(server.url)
    case_id = open_case_in_chat(chat, c)
    with c.db.transaction() as s:
        s.get(Conversation, f"webchat:{chat.session_id}").stage = "waiting"
    replies = turn(chat, c, "I changed my mind about the reset")
    assert [m["text"] for m in replies] == [c.renderer.chat("cancel_confirm", "en", {"case_id": case_id})]
    assert replies[0]["buttons"][0]["label"] == "Cancel my request"
    with c.db.transaction() as s:
        assert s.get(Case, case_id).state == "verifying"
    assert "has been cancelled" in turn(chat, c, "Cancel my request")[0]["text"]
    with c.db.transaction() as s:
        assert s.get(Case, case_id).state == "cancelled"
