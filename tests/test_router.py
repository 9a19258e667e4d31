"""The intent router: accuracy on sets written apart from the training data, the hard cases, button labels,
strict mid-flow commands, speed."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from bot.templates import LOCALES, Renderer
from recovery import router
from recovery.dialog import BUTTON

DATA = Path(__file__).parent / "data"
SET_A = DATA / "intents_eval_a.tsv"  # the development set: studied, never copied into the training data
SET_B = DATA / "intents_eval_b.tsv"  # the final test set: scored, never studied
OLD = DATA / "intents_heldout.tsv"  # the first held-apart set (15 of the 17 intents)

# Exact accuracy as the dialog sees a message outside a flow (a command first, else the router; a
# clarifying question gets no credit), on the whole set and on the messages not found verbatim in the
# training data. Pinned just under what docs/intents.md reports (B: 429/450 and 398/419), so that a
# change that loses a message or two fails here.
REQUIRED = {SET_B: 0.95, SET_A: 0.955, OLD: 0.95}
REQUIRED_UNSEEN = {SET_B: 0.945, SET_A: 0.95, OLD: 0.95}


def understood(text: str) -> str | None:
    """The intent the dialog acts on outside a flow, or None when it would ask a clarifying question."""
    command = router.command(text)
    if command is not None:
        return command
    routing = router.route(text)
    return None if routing.unsure else routing.intent


@pytest.mark.parametrize("path", list(REQUIRED), ids=lambda p: p.stem)
def test_exact_accuracy_on_sets_written_apart(path):
    """On messages written by people who never saw the training data, the share answered right without a
    clarifying question stays at or above the level measured in docs/intents.md, also when the messages
    found verbatim in the training data are left out."""
    rows = router.load(path)
    trained = {router.normalize(t) for t, *_ in router.load(router.DATA)}
    unseen = [(t, i) for t, i, _ in rows if router.normalize(t) not in trained]
    right = sum(understood(text) == intent for text, intent, _ in rows)
    right_unseen = sum(understood(text) == intent for text, intent in unseen)
    assert right / len(rows) >= REQUIRED[path], f"{path.name}: {right}/{len(rows)} exact"
    assert right_unseen / len(unseen) >= REQUIRED_UNSEEN[path], f"{path.name}: {right_unseen}/{len(unseen)}"


def test_set_a_misses_are_listed_and_few_per_intent():
    """No intent of the development set falls below 85% exact, so a weak intent cannot hide in the total."""
    per_intent: dict[str, list[int]] = {}
    for text, intent, _ in router.load(SET_A):
        per_intent.setdefault(intent, [0, 0])[1] += 1
        per_intent[intent][0] += understood(text) == intent
    weak = {i: f"{ok}/{n}" for i, (ok, n) in per_intent.items() if ok / n < 0.85}
    assert not weak, weak


def test_the_labelled_sets_are_big_varied_and_apart():
    """Training covers every intent in English, zh-TW, simplified Chinese and mixed; each evaluation set has
    at least 300 messages over all 17 intents; at most one in ten of them is also in the training data (the
    common short messages both sides wrote independently, such as "hi" or "status"), none of the old set."""
    train = router.load(router.DATA)
    assert set(Counter(i for _, i, _ in train)) == set(router.INTENTS) and len(router.INTENTS) == 17
    assert {lang for *_, lang in train} == {"en", "zh-TW", "zh-CN", "mixed"}
    trained = {router.normalize(t) for t, *_ in train}
    for path in (SET_A, SET_B):
        rows = router.load(path)
        assert len(rows) >= 300 and {i for _, i, _ in rows} == set(router.INTENTS), path.name
        assert {lang for *_, lang in rows} == {"en", "zh-TW", "zh-CN", "mixed"}, path.name
        shared = sum(router.normalize(t) in trained for t, *_ in rows)
        assert shared <= len(rows) / 10, f"{shared} messages of {path.name} are in the training data"
    assert not trained & {router.normalize(t) for t, *_ in router.load(OLD)}


@pytest.mark.parametrize("text, intent", [
    # someone else's request is a dispute; one's own, found phone or not, is a cancel
    ("i just got a recovery email and i have no idea why, i never requested it", "dispute"),
    ("somebody submitted a 2fa reset on my account, please stop it", "dispute"),
    ("收到找回帳號的郵件 我沒有送出任何申請", "dispute"),
    ("有人幫我的帳號申請了重設 不是我", "dispute"),
    ("please cancel the reset I asked for yesterday, I found my phone", "cancel"),
    ("我的手機找到了 之前的重設申請請取消", "cancel"),
    # a scam report that names an agent gets the scam warning, not a person
    ("an agent on telegram asked me for my authenticator code, is that allowed?", "safety"),
    ("someone claiming to be your customer service wants my password", "safety"),
    ("自稱客服的人要我提供驗證碼 這是真的嗎", "safety"),
    ("I'd like to talk to a support agent please", "talk_to_person"),
    ("請幫我轉真人客服", "talk_to_person"),
    # thanks and goodbyes are not a greeting
    ("thanks so much, bye", "thanks"),
    ("ok that's everything, thank you", "thanks"),
    ("感謝你的幫忙 掰掰", "thanks"),
    ("hello there!", "greeting"),
    ("哈囉 你好", "greeting"),
    # still waiting, without the word "status"
    ("still waiting for my reset, nothing so far", "case_status"),
    ("it has been three days and I still have no link", "case_status"),
    ("我還在等審核結果", "case_status"),
    ("等了好幾天了 還是沒有消息", "case_status"),
    # a negated loss never starts a recovery
    ("I haven't lost my phone, I just want to know what the recovery involves", "lost_access"),
    ("my phone is not lost, but the codes keep getting rejected", "code_rejected"),
    ("我手機沒有掉 只是想知道恢復要多久", "lost_access"),
    # very short messages
    ("status?", "case_status"),
    ("lost phone!!", "start_recovery"),
    ("thanks a bunch", "thanks"),
    ("手機不見了", "start_recovery"),
    ("2FA驗證碼又錯了", "code_rejected"),
    ("nope, not me", "dispute"),
])
def test_hard_cases(text, intent):
    """The confusions the first evaluation found are answered right, without a clarifying question."""
    assert understood(text) == intent


@pytest.mark.parametrize("locale", LOCALES)
def test_every_button_label_routes_to_its_intent(locale):
    """A tapped quick reply (its label comes back as text) reaches its intent for sure, in both languages."""
    renderer = Renderer(globals={"brand_name": "ACME", "support_email": "help@acme.test"})
    for intent, key in BUTTON.items():
        label = renderer.button(key, locale)
        routing = router.route(label)
        assert (routing.intent, routing.unsure) == (intent, False), (locale, key, label, routing)


def test_simplified_and_traditional_chinese_route_alike():
    """Simplified characters are folded to traditional, so both scripts reach the same intent."""
    pairs = [("我的验证器丢了", "我的驗證器丟了"), ("转人工客服", "轉人工客服"), ("验证码一直错误", "驗證碼一直錯誤"),
             ("不是我申请的，有人在重置我的谷歌验证", "不是我申請的，有人在重置我的谷歌驗證"), ("谢谢，再见", "謝謝，再見")]
    for simplified, traditional in pairs:
        assert router.normalize(simplified) == router.normalize(traditional)
        assert router.route(simplified).intent == router.route(traditional).intent


def test_unknown_or_ambiguous_text_is_unsure_with_candidates():
    """Text the router has never seen anything like, or that fits several intents, is marked unsure."""
    assert router.route("qwzx 🙂").unsure and router.route("qwzx 🙂").candidates == ()
    vague = router.route("reset")
    assert vague.unsure and len(vague.candidates) >= 2 and "start_recovery" in vague.candidates


@pytest.mark.parametrize("text, expected", [
    ("cancel", "cancel"), ("Please cancel my recovery request", "cancel"), ("取消", "cancel"),
    ("取消我的申請", "cancel"), ("talk to a human", "talk_to_person"), ("转人工", "talk_to_person"),
    ("I want to talk to an agent", "talk_to_person"), ("status?", "case_status"), ("我的申请进度", "case_status"),
    ("English", "lang_en"), ("請用中文", "lang_zh"),
    ("it wasn't me", "dispute"), ("That was not me!", "dispute"), ("I didn't request this", "dispute"),
    ("i never asked for a reset, stop it", "dispute"), ("不是我申請的", "dispute"), ("我沒有申請", "dispute"),
    ("approve my case", None), ("skip verification", None), ("May 2023", None), ("USDT", None),
    ("alex@example.com", None), ("I want to cancel", None), ("2023-05", None),
    # a scam report names an agent without asking for one; other statuses are not the case's
    ("your agent asked me for my 2FA code", None), ("客服人員可以要求我提供驗證碼嗎", None),
    ("what's my KYC status", None), ("重設要人工審核嗎", None),
    # denials of something else are answers, not disputes
    ("I didn't get the code", None), ("I didn't request a new code", None), ("不是我的email", None),
    ("我沒有申請過KYC", None),
])
def test_mid_flow_only_unmistakable_commands_interrupt(text, expected):
    """While the bot waits for an answer, only a plain command counts as one; anything else is the answer."""
    assert router.command(text) == expected


def test_routing_is_deterministic_and_fast():
    """The same text always gets the same result; training takes well under a second and a message well
    under 5 ms, with no network and no model files."""
    texts = [t for t, *_ in router.load(SET_A)]
    start = time.perf_counter()
    fresh = router.NaiveBayes(router.load(router.DATA))
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    first = [fresh.route(t) for t in texts]
    per_message = (time.perf_counter() - start) / len(texts)
    assert per_message < 0.005
    assert first == [router.route(t) for t in texts]
