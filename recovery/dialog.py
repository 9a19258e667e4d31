"""The customer dialog, the same for every channel: a message in, message keys out (via the outbox).

Channels hand over plain text plus what they know of the contact; they render the keys with their
templates. The dialog never asks for a password, an authenticator code or a recovery phrase: the only
code it asks for is the one it emailed to the address on file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.orm import Session

from recovery import limits
from recovery.cases import CODE_EXPIRED, CODE_LOCKED, CODE_OK, CODE_REJECTED, CaseService
from recovery.deps import Deps
from recovery.errors import IllegalTransition, LimitReached
from recovery.machine import FINAL, State
from recovery.models import Conversation

EMAIL = re.compile(r"[^@\s<>(),;:]+@[^@\s<>(),;:]+\.[A-Za-z]{2,}")
CODE = re.compile(r"(?<!\d)(\d[\s-]?){5}\d(?!\d)")
CJK = re.compile(r"[\u3400-\u9fff]")

INTENTS = (
    ("lang_en", re.compile(r"^\s*(english|英文)\s*$", re.I)),
    ("lang_zh", re.compile(r"^\s*(中文|繁體中文|chinese)\s*$", re.I)),
    ("cancel", re.compile(r"\bcancel\b|取消", re.I)),
    ("status", re.compile(r"\bstatus\b|progress|進度|狀態|进度", re.I)),
    ("recover", re.compile(r"lost|lose|stolen|broke|recover|reset|can'?t (access|log)|cannot (access|log)|"
                           r"no longer have|new phone|遺失|丟|不見|找回|重設|重置|換手機|恢復", re.I)),
    ("what_is_2fa", re.compile(r"what.*(2fa|two.?factor|authenticator)|什麼是|何謂|兩步驟|雙重驗證", re.I)),
)


@dataclass(frozen=True)
class TurnResult:
    """What a channel needs to know after a turn: the text it may keep (secrets masked) and which kinds
    of secret were found, so it can redact the message at the source where the channel allows it."""
    stored_text: str
    secrets: tuple[str, ...] = ()


@dataclass
class Incoming:
    conversation_key: str
    channel: str
    text: str
    locale: str | None = None
    ip: str | None = None
    verified_account_id: str | None = None
    meta: dict = field(default_factory=dict)


def intent(text: str) -> str | None:
    for name, pattern in INTENTS:
        if pattern.search(text):
            return name
    return None


def looks_like_code(text: str) -> bool:
    return bool(CODE.search(text))


def redact_codes(text: str) -> str:
    """Mask anything shaped like a one-time code before a transcript is stored."""
    return CODE.sub("••••••", text)


class Dialog:
    def __init__(self, session: Session, deps: Deps):
        self.s, self.deps = session, deps
        self.cases = CaseService(session, deps)
        self.now = self.cases.now

    def _conversation(self, msg: Incoming) -> Conversation:
        conv = self.s.get(Conversation, msg.conversation_key, with_for_update=True)
        if conv is None:
            conv = Conversation(key=msg.conversation_key, channel=msg.channel,
                                locale=msg.locale if msg.locale in ("en", "zh-TW") else "en",
                                stage="idle", data={}, created_at=self.now, updated_at=self.now)
            self.s.add(conv)
        return conv

    def say(self, conv: Conversation, message: str, *buttons: str, **context) -> None:
        self.cases.notify.chat(None, conv.key, message, locale=conv.locale, buttons=buttons,
                               key=f"{conv.key}:{self._turn}:{self._n}", **context)
        self._n += 1

    def handle(self, msg: Incoming, turn: str) -> TurnResult:
        """React to one customer message. `turn` (the inbox event id) keys the replies, so a
        reprocessed event cannot post its replies twice."""
        self._turn, self._n = turn, 0
        conv = self._conversation(msg)
        text = msg.text.strip()
        if CJK.search(text) and conv.locale != "zh-TW":
            conv.locale = "zh-TW"
        kind = intent(text)
        if kind in ("lang_en", "lang_zh"):
            conv.locale = "en" if kind == "lang_en" else "zh-TW"
            self.say(conv, "language_switched")
        elif kind == "status":
            self._status(conv)
        elif kind == "cancel" and conv.case_id:
            self._cancel(conv)
        elif conv.stage == "await_email":
            self._email(conv, msg, text)
        elif conv.stage == "await_code":
            self._code(conv, msg, text)
        elif conv.stage == "await_fact":
            self._fact(conv, text)
        elif kind == "recover":
            self._start(conv)
        elif kind == "what_is_2fa":
            self.say(conv, "what_is_2fa", "lost_authenticator")
        elif looks_like_code(text):
            # a code nobody asked for is likely an authenticator code: we never need it
            self.say(conv, "never_ask")
        else:
            self.say(conv, "menu", "lost_authenticator", "what_is_2fa")
        conv.updated_at = self.now
        stored = redact_codes(msg.text)
        return TurnResult(stored, ("code",) if stored != msg.text else ())

    # ---- steps ------------------------------------------------------------------------------------

    def _current_case(self, conv: Conversation):
        if not conv.case_id:
            return None
        case = self.cases.get(conv.case_id)
        return case

    def _start(self, conv: Conversation) -> None:
        case = self._current_case(conv)
        if case is not None and State(case.state) not in FINAL:
            self.say(conv, "case_status", state=case.state, case_id=case.id)
            return
        conv.stage, conv.case_id = "await_email", None
        self.say(conv, "ask_email")

    def _email(self, conv: Conversation, msg: Incoming, text: str) -> None:
        match = EMAIL.search(text)
        if not match:
            self.say(conv, "bad_email")
            return
        if not self._allowed(msg, "open", per_contact=3, per_ip=10):
            self.say(conv, "rate_limited")
            return
        case = self.cases.open(conversation_key=conv.key, channel=conv.channel, email=match.group(0),
                               locale=conv.locale, verified_account_id=msg.verified_account_id)
        conv.case_id, conv.stage = case.id, "await_code"
        # The same words whether or not the address is registered (no account enumeration).
        self.say(conv, "code_sent", "resend_code", minutes=self.deps.policy.code_ttl_minutes)

    def _allowed(self, msg: Incoming, what: str, *, per_contact: int, per_ip: int) -> bool:
        window = timedelta(hours=1)
        ok = limits.allow(self.s, f"{what}:contact:{msg.conversation_key}", now=self.now, limit=per_contact,
                          window=window)
        if ok and msg.ip:
            ok = limits.allow(self.s, f"{what}:ip:{msg.ip}", now=self.now, limit=per_ip, window=window)
        return ok

    def _code(self, conv: Conversation, msg: Incoming, text: str) -> None:
        case = self._current_case(conv)
        if case is None or case.state != State.VERIFYING:
            conv.stage = "idle"
            self._status(conv)
            return
        if re.search(r"resend|again|重寄|重新|再寄", text, re.I):
            try:
                self.cases.resend_code(case.id)
                self.say(conv, "code_resent", minutes=self.deps.policy.code_ttl_minutes)
            except LimitReached:
                self.say(conv, "resend_limit")
            return
        match = CODE.search(text)
        if not match:
            self.say(conv, "ask_code", "resend_code")
            return
        p = self.deps.policy
        if not self._allowed(msg, "code", per_contact=p.attempts_per_contact_per_hour,
                             per_ip=p.attempts_per_ip_per_hour):
            self.say(conv, "rate_limited")
            return
        outcome = self.cases.submit_code(case.id, match.group(0))
        if outcome.status == CODE_OK:
            self._ask_next(conv, case, first=True)
        elif outcome.status == CODE_EXPIRED:
            self.say(conv, "code_expired", "resend_code")
        elif outcome.status in (CODE_LOCKED, CODE_REJECTED):
            conv.stage = "idle"  # the case's own closing message follows through the outbox
        else:
            self.say(conv, "code_wrong", "resend_code", remaining=outcome.remaining)

    def _ask_next(self, conv: Conversation, case, first: bool = False) -> None:
        question = self.cases.next_question(case)
        if question is None:
            conv.stage = "waiting"
            self.say(conv, "checks_done", case_id=case.id)
            return
        conv.stage = "await_fact"
        self.say(conv, "ask_fact", fact=question, first=first)

    def _fact(self, conv: Conversation, text: str) -> None:
        case = self._current_case(conv)
        if case is None or case.state != State.VERIFYING:
            conv.stage = "idle"
            self._status(conv)
            return
        try:
            self.cases.answer_fact(case.id, text)
        except IllegalTransition:
            conv.stage = "idle"
            self._status(conv)
            return
        self._ask_next(conv, case)

    def _status(self, conv: Conversation) -> None:
        case = self._current_case(conv)
        if case is None:
            self.say(conv, "no_case", "lost_authenticator")
        else:
            self.say(conv, "case_status", state=case.state, case_id=case.id)

    def _cancel(self, conv: Conversation) -> None:
        case = self._current_case(conv)
        if case is None or State(case.state) in FINAL:
            self._status(conv)
            return
        # Cancelling only ever makes an account safer, so the chat may do it without proof.
        self.cases.cancel(case.id, actor="customer", channel=conv.channel, reason="cancelled in chat")
        conv.stage = "idle"
