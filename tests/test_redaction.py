"""Secrets pasted in chat are masked before storage (transcript, inbox, logs) and the customer is warned in
their language; the code the bot asked for is expected, and the bot never asks for any secret itself."""
from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from mnemonic import Mnemonic
from sqlalchemy import select

from bot.templates import BUILTIN
from recovery import router
from recovery.clock import ManualClock
from recovery.dialog import Dialog, Incoming
from recovery.models import ChatMessage, InboxEvent
from recovery.redact import redact
from tests.conftest import ChatClient, code_in
from tests.helpers import account, load_accounts
from tests.helpers import folder_mails
from tests.test_security import dump_database, logged_by_us

# Fixed phrases (valid BIP-39 checksums), so a failure is reproducible.
PHRASE_12 = Mnemonic("english").to_mnemonic(bytes(range(16)))
PHRASE_24 = Mnemonic("english").to_mnemonic(bytes(range(100, 132)))
PHRASE_ZH = Mnemonic("chinese_traditional").to_mnemonic(bytes(range(50, 66)))


def manual_clock() -> ManualClock:
    return ManualClock(datetime.now(timezone.utc).replace(microsecond=0))


def turn(chat: ChatClient, c, text: str) -> list[str]:
    chat.say(text)
    c.worker.drain()
    return [m["text"] for m in chat.poll() if m["sender"] == "bot"]


def leaked(haystack: str, phrase: str) -> list[str]:
    """Runs of four consecutive words of the phrase found in the haystack (one word alone is no leak)."""
    words = phrase.split()
    runs = [" ".join(words[i:i + 4]) for i in range(len(words) - 3)]
    return [r for r in runs if r in haystack]


# ---- what is found ------------------------------------------------------------------------------------

PHRASE, PASSWORD = "[recovery phrase hidden]", "[password hidden]"


@pytest.mark.parametrize("text, kinds, masked", [
    (PHRASE_12, ("recovery_phrase",), PHRASE),
    (f"my seed is {PHRASE_24}. Please help", ("recovery_phrase",), f"my seed is {PHRASE}. Please help"),
    ("\n".join(f"{n}. {w}" for n, w in enumerate(PHRASE_12.split(), 1)), ("recovery_phrase",), f"1. {PHRASE}"),
    (", ".join(PHRASE_12.split()), ("recovery_phrase",), PHRASE),
    (PHRASE_12.replace(" ", "x ", 5).replace("x ", " ", 4), ("recovery_phrase",), PHRASE),  # a typo in word 5
    (f"我的助記詞是 {PHRASE_ZH}", ("recovery_phrase",), f"我的助記詞是 {PHRASE}"),
    ("seed words: " + " ".join(PHRASE_12.split()[:8]), ("recovery_phrase",), f"seed words: {PHRASE}"),
    ("my password is hunter2! and I lost it", ("password",), f"my password is {PASSWORD} and I lost it"),
    ("password: 'correct horse battery'", ("password",), f"password: {PASSWORD}"),
    ("我的密碼是abc123請幫我", ("password",), f"我的密碼是{PASSWORD}請幫我"),
    ("密码：Qwe!234", ("password",), f"密码：{PASSWORD}"),
    ("my authenticator shows 482 913", ("code",), "my authenticator shows ••••••"),
    ("482913", ("code",), "••••••"),
    ("code 482-913", ("code",), "code ••••••"),
    ("my backup code is 3f2a1-9bc04-77e1d-0a5c2", ("recovery_code",), "my backup code is [recovery code hidden]"),
    ("5HueCGU8rMjxEXxiPuD5BDku4MkFqeZyd4dZ1jvhTVqvbTLvyTJ", ("private_key",), "[private key hidden]"),
])
def test_secrets_are_found_and_masked(text, kinds, masked):
    """Recovery phrases (12/24 words, numbered, comma-separated, with a typo, Chinese, or 8 words after a
    cue), passwords, codes, recovery codes and private keys are masked; the rest of the text stays."""
    assert redact(text) == (masked, kinds)


@pytest.mark.parametrize("text", [
    "my password is wrong", "I forgot my password", "first deposit 2023-05", "I sent 150000 USDT",
    "call me on 0912 345 678", "May 2023", " ".join(PHRASE_12.split()[:11]),
    "I can also help you with your account when you have the phone and the code again because",
])
def test_ordinary_text_is_left_alone(text):
    """Complaints about passwords, dates, amounts, phone numbers and prose made of common words are not secrets."""
    assert redact(text) == (text, ())


def test_no_training_utterance_looks_like_a_secret():
    """None of the router's hundreds of ordinary customer messages is masked (no false alarms)."""
    flagged = [t for t, *_ in router.load(router.DATA) if redact(t).found]
    assert flagged == []


# ---- in the product ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("phrase", [PHRASE_12, PHRASE_24], ids=["12 words", "24 words"])
def test_a_pasted_recovery_phrase_is_masked_everywhere_and_warned_about(any_db_url, live, caplog, phrase):
    """A phrase pasted in the web chat is warned about, and no run of its words is in chat_messages,
    inbox_events, any other table (SQLite and PostgreSQL) or our logs."""
    caplog.set_level("DEBUG")
    server = live(any_db_url, worker=False, clock=manual_clock())
    c = server.container
    chat = ChatClient(server.url)
    replies = turn(chat, c, f"here are my words so you can fix it: {phrase}")
    assert len(replies) == 1 and "recovery phrase" in replies[0] and "never share" in replies[0]
    with c.db.transaction() as s:
        typed = s.scalar(select(ChatMessage.text).where(ChatMessage.sender == "customer"))
        event = s.scalar(select(InboxEvent))
        assert typed == "here are my words so you can fix it: [recovery phrase hidden]"
        assert event.processed_at and event.payload["text_redacted"] == typed and "text_enc" not in event.payload
    assert leaked(dump_database(c), phrase) == []
    assert "masked recovery_phrase" in logged_by_us(caplog) and leaked(logged_by_us(caplog), phrase) == []


def test_a_zh_tw_customer_is_warned_in_zh_tw(sqlite_url, live):
    """A phrase pasted in a zh-TW chat gets the warning in Traditional Chinese, and a password in English gets
    it in English."""
    server = live(sqlite_url, worker=False, clock=manual_clock())
    c = server.container
    zh = ChatClient(server.url, locale="zh-TW")
    [warning] = turn(zh, c, PHRASE_12)
    assert warning.startswith("為了您的安全") and "助記詞" in warning
    [warning] = turn(zh, c, f"我的助記詞是 {PHRASE_ZH}")
    assert "助記詞" in warning
    en = ChatClient(server.url)
    [warning] = turn(en, c, "my password is Tr0ub4dor&3, can you check my account")
    assert "looked like a password" in warning and "change it now" in warning
    assert "Tr0ub4dor" not in dump_database(c)


def test_the_emailed_code_is_expected_but_still_masked(sqlite_url, live):
    """At the code step the emailed code is accepted without a warning and kept only as '••••••'."""
    server = live(sqlite_url, worker=False, clock=manual_clock())
    c = server.container
    load_accounts(c, [account("acct-1001", "alex@example.com")])
    chat = ChatClient(server.url)
    turn(chat, c, "I lost my authenticator")
    turn(chat, c, "alex@example.com")
    code = code_in(folder_mails(c, "verification_code", to="alex@example.com")[-1])
    replies = turn(chat, c, f"{code[:3]} {code[3:]}")
    assert len(replies) == 1 and "that code is right" in replies[0]
    with c.db.transaction() as s:
        stored = s.scalars(select(ChatMessage.text).where(ChatMessage.sender == "customer")).all()
    assert stored[-1] == "••••••" and code not in dump_database(c)


def test_turn_result_names_the_secrets_for_the_channel(make_container, sqlite_url):
    """The dialog tells a channel the masked text and the kinds found, so it can redact its own copy too."""
    c = make_container(sqlite_url, clock=manual_clock())
    with c.db.transaction() as s:
        result = Dialog(s, c.deps).handle(Incoming(conversation_key="intercom:1", channel="intercom",
                                                   text=f"{PHRASE_12} and my password is hunter2"), turn="1")
    assert result.secrets == ("recovery_phrase", "password")
    assert result.stored_text == "[recovery phrase hidden] and my password is [password hidden]"
    with c.db.transaction() as s:
        result = Dialog(s, c.deps).handle(Incoming(conversation_key="intercom:1", channel="intercom",
                                                   text="what is 2fa?"), turn="2")
    assert result == type(result)("what is 2fa?", ())


def test_the_bot_never_asks_for_a_secret():
    """No chat text asks the customer to send a password, an authenticator or recovery code, or a phrase;
    every mention of them in the templates is a warning or an explanation."""
    asking = re.compile(r"(type|send|enter|share|give|tell|paste|provide)\s+(us\s+|me\s+)?(your|the)\s+"
                        r"(password|2fa code|authenticator code|recovery (phrase|code)|seed)", re.I)
    asking_zh = re.compile(r"請(輸入|提供|傳送|告訴我們)(您的)?(密碼|助記詞|備用碼|驗證器上的)")
    for name in ("chat/messages.j2", "locale/zh_TW/LC_MESSAGES/messages.po"):
        source = (BUILTIN / name).read_text()
        assert not asking.search(source) and not asking_zh.search(source), name
