"""The customer dialog, the same for every channel: a message in, message keys out (via the outbox).

Channels hand over plain text plus what they know of the contact; they render the keys with their
templates. The dialog never asks for a password, an authenticator code, a recovery code or a recovery
phrase: the only code it asks for is the one it emailed to the address on file. Whatever a customer
pastes, secrets are masked (recovery.redact) before anything is stored, and the customer is warned.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import limits, router
from recovery.cases import CODE_EXPIRED, CODE_LOCKED, CODE_OK, CODE_REJECTED, CaseService
from recovery.checks import PASS
from recovery.deps import Deps
from recovery.errors import IllegalTransition, LimitReached
from recovery.machine import FINAL, OPEN, State
from recovery.models import Case, Conversation
from recovery.redact import CODE, EMAIL, MASKS, redact

log = logging.getLogger(__name__)

CJK = re.compile(r"[\u3400-\u9fff]")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
RESEND = re.compile(r"resend|again|重寄|重新|再寄", re.I)

AWAITING = ("await_email", "await_code", "await_fact")  # the bot asked for something specific
SEVERE = ("recovery_phrase", "private_key", "recovery_code", "password")  # warned about, turn ends
MENU = ("lost_authenticator", "what_is_2fa", "code_rejected", "new_phone")
# Each intent's quick-reply button (template block btn_<key>); its label routes back to the intent.
BUTTON = {"start_recovery": "lost_authenticator", "cancel": "cancel_request"} | {
    i: i for i in router.TOPICS + ("talk_to_person", "case_status")}
FOLLOW_UPS = {
    "what_is_2fa": ("why_2fa", "enable_2fa"),
    "why_2fa": ("enable_2fa", "safety"),
    "enable_2fa": ("new_phone", "code_rejected"),
    "code_rejected": ("lost_authenticator", "talk_to_person"),
    "new_phone": ("enable_2fa", "lost_authenticator"),
    "lost_access": ("lost_authenticator", "talk_to_person"),
    "safety": ("lost_authenticator", "talk_to_person"),
}


@dataclass(frozen=True)
class TurnResult:
    """What a channel needs to know after a turn: the text it may keep (secrets masked) and which kinds
    of secret were found ("recovery_phrase", "private_key", "recovery_code", "password", "code"), so it
    can redact the message at the source where the channel allows it. An expected email code is masked
    and named ("code") too; whether the customer was warned is the dialog's business."""
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
        masked = redact(msg.text)
        self._follow_language(conv, masked.text)
        if masked.found:
            # The turn (inbox event) id, not the conversation key: a web chat key reads its transcript.
            log.info("turn %s: masked %s", turn, ", ".join(masked.kinds))
        if not self._warned(conv, masked.kinds) and not self._resumed(conv, msg):
            self._respond(conv, msg, msg.text.strip())
        conv.updated_at = self.now
        return TurnResult(masked.text, masked.kinds)

    def note(self, conv: Conversation, message: str, **context) -> None:
        """An internal note to the support team in the conversation (channels with people only)."""
        self.cases.notify.note(conv.key, message, key=f"{conv.key}:{self._turn}:{self._n}", **context)
        self._n += 1

    def staff_command(self, conversation_key: str, *, channel: str, verb: str, email: str | None,
                      initiator: str | None, teammate: str, turn: str) -> None:
        """A teammate asked the bot, in an internal note, to take the customer through a recovery.

        The case records the teammate (as their approver id) as its initiator, so they can never approve
        it. A teammate who cannot be matched to an approver id starts nothing. Nothing about the checks
        changes: the code still goes only to the address on file, and the customer still answers.
        """
        self._turn, self._n = turn, 0
        conv = self._conversation(Incoming(conversation_key=conversation_key, channel=channel, text=""))
        conv.updated_at = self.now
        if verb == "help":
            self.note(conv, "staff_help")
            return
        if initiator is None:
            self.note(conv, "staff_unmatched", teammate=teammate)
            return
        case = self._current_case(conv)
        if case is not None and State(case.state) not in FINAL:
            self.note(conv, "staff_case_open", case_id=case.id, state=case.state)
            return
        self._remember(conv, initiator=initiator)
        conv.case_id = None
        if email:
            self._open(conv, email, opened_by=initiator, verified_account_id=None)
            self.note(conv, "staff_started", initiator=initiator, case_id=conv.case_id)
            return
        conv.stage = "await_email"
        self.say(conv, "staff_ask_email")
        self.note(conv, "staff_asked_email", initiator=initiator)

    # ---- safety and language -------------------------------------------------------------------------

    def _warned(self, conv: Conversation, kinds: tuple[str, ...]) -> bool:
        """Warn about pasted secrets; True when the turn ends here. A code is expected only where the bot
        asked for one (the emailed code) or asked a question a number may answer."""
        severe = [k for k in kinds if k in SEVERE]
        if severe:
            self.say(conv, "secret_warning", "lost_authenticator", "safety", kinds=severe)
            return True
        if "code" in kinds and conv.stage not in ("await_code", "await_fact"):
            self.say(conv, "never_ask")
            return True
        return False

    @staticmethod
    def _follow_language(conv: Conversation, text: str) -> None:
        """Reply in the language the customer writes: Chinese characters mean zh-TW, a few English words
        mean English; masks and emails say nothing about it. A language the customer chose sticks."""
        if (conv.data or {}).get("language_chosen"):
            return
        for mask in MASKS.values():
            text = text.replace(mask, " ")
        text = EMAIL.sub(" ", text)
        if CJK.search(text):
            conv.locale = "zh-TW"
        elif len(LATIN_WORD.findall(text)) >= 3:
            conv.locale = "en"

    # ---- routing ---------------------------------------------------------------------------------------

    def _respond(self, conv: Conversation, msg: Incoming, text: str) -> None:
        misses = (conv.data or {}).get("unsure", 0)  # "unsure twice in a row": any other turn resets it
        if misses:
            self._remember(conv, unsure=0)
        command = router.command(text)
        if command is not None:  # unmistakable: it interrupts whatever was asked
            self._do(conv, msg, command, confirmed=True)
        elif conv.stage == "await_code":
            self._code(conv, msg, text)
        elif conv.stage == "await_fact":
            self._fact(conv, text)  # whatever it says is the answer, checked like any other
        elif conv.stage == "await_email" and EMAIL.search(text):
            self._email(conv, msg, text)
        else:
            routing = router.route(text)
            off_topic = routing.unsure or routing.intent in ("something_else", "greeting")
            if conv.stage == "await_email" and off_topic:
                self.say(conv, "bad_email")
            elif routing.unsure:
                self._unsure(conv, routing, misses + 1)
            else:
                self._do(conv, msg, routing.intent)

    def _do(self, conv: Conversation, msg: Incoming, intent: str, *, confirmed: bool = False) -> None:
        if intent in ("lang_en", "lang_zh"):
            conv.locale = "en" if intent == "lang_en" else "zh-TW"
            self._remember(conv, language_chosen=True)
            self.say(conv, "language_switched")
        elif intent == "case_status":
            self._status(conv)
        elif intent == "cancel":
            self._cancel(conv, confirmed=confirmed)
        elif intent == "talk_to_person":
            self._handover(conv, "customer_asked")
        elif intent == "start_recovery":
            self._start(conv)
        elif intent in router.TOPICS:
            self.say(conv, intent, *FOLLOW_UPS[intent], **self._guidance_context())
        elif intent == "greeting":
            self.say(conv, "menu", *MENU)
        else:
            self.say(conv, "something_else", "lost_authenticator", "what_is_2fa", "talk_to_person")

    def _unsure(self, conv: Conversation, routing: router.Routing, misses: int) -> None:
        """Ask rather than guess; a second miss in a row goes to a person."""
        if misses >= 2:
            self._handover(conv, "bot_unsure")
            return
        self._remember(conv, unsure=misses)
        offered = [BUTTON[i] for i in routing.candidates if i in BUTTON and i != "talk_to_person"][:3]
        self.say(conv, "clarify", *(offered or MENU[:2]), "talk_to_person")

    @staticmethod
    def _remember(conv: Conversation, **values) -> None:
        conv.data = dict(conv.data or {}, **values)  # a new dict, so the JSON column is written

    def _guidance_context(self) -> dict:
        holds = [rule.hold_hours for rule in self.deps.policy.levels.values()]
        return {"hold_hours_min": min(holds), "hold_hours_max": max(holds)}

    def _handover(self, conv: Conversation, reason: str) -> None:
        """The handover contract: channels with people (Intercom) assign the conversation and post the
        `handover_note` block with this context; the web chat points to support by email."""
        case = self._current_case(conv)
        context = {"case_id": case.id if case else None, "state": case.state if case else None,
                   "reason": reason, "channel": conv.channel, "language": conv.locale}
        if case is not None:
            context |= {"risk": case.risk_level, "risk_reasons": list(case.risk_reasons or []),
                        "checks": [{"name": c.name, "result": c.result} for c in self.cases.checks(case)]}
        self.say(conv, "handover", **context)

    # ---- conversation state -------------------------------------------------------------------------------

    def _current_case(self, conv: Conversation):
        if not conv.case_id:
            return None
        return self.cases.get(conv.case_id)

    def _resumed(self, conv: Conversation, msg: Incoming) -> bool:
        """A logged-in contact whose account has an open case continues it here instead of opening a
        second one: the conversation takes the case over, and the case's news now comes here."""
        if conv.case_id or not msg.verified_account_id:
            return False
        case = self.s.scalar(select(Case).where(Case.account_id == msg.verified_account_id,
                                                Case.state.in_([s.value for s in OPEN]))
                             .order_by(Case.created_at.desc()).limit(1))
        if case is None:
            return False
        conv.case_id, case.conversation_id = case.id, conv.key
        self.say(conv, "case_resumed", case_id=case.id)
        if case.state != State.VERIFYING:
            conv.stage = "waiting"
            self._status(conv)
        elif self.cases.check(case, "email_code").result == PASS:
            self._ask_next(conv, case)
        else:
            conv.stage = "await_code"
            self.say(conv, "ask_code", "resend_code")
        return True

    # ---- the recovery steps ---------------------------------------------------------------------------------

    def _start(self, conv: Conversation) -> None:
        case = self._current_case(conv)
        if case is not None and State(case.state) not in FINAL:
            self.say(conv, "case_status", state=case.state, case_id=case.id)
            return
        conv.stage, conv.case_id = "await_email", None
        self.say(conv, "ask_email")

    def _email(self, conv: Conversation, msg: Incoming, text: str) -> None:
        match = EMAIL.search(text)
        p = self.deps.policy
        if not self._allowed(msg, "open", per_contact=p.case_starts_per_contact_per_hour,
                             per_ip=p.case_starts_per_ip_per_hour):
            self.say(conv, "rate_limited")
            return
        self._open(conv, match.group(0), opened_by=(conv.data or {}).get("initiator") or "customer",
                   verified_account_id=msg.verified_account_id)

    def _open(self, conv: Conversation, email: str, *, opened_by: str, verified_account_id: str | None) -> None:
        case = self.cases.open(conversation_key=conv.key, channel=conv.channel, email=email, locale=conv.locale,
                               opened_by=opened_by, verified_account_id=verified_account_id)
        conv.case_id, conv.stage = case.id, "await_code"
        self._remember(conv, initiator=None)  # a later case in this conversation is the customer's own
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
        if RESEND.search(text):
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
        outcome = self.cases.submit_code(case.id, re.sub(r"\D", "", match.group(0)))
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

    def _cancel(self, conv: Conversation, *, confirmed: bool) -> None:
        case = self._current_case(conv)
        if case is None or State(case.state) in FINAL:
            if conv.stage == "await_email":
                conv.stage = "idle"  # nothing opened yet: just stop asking for the address
            self.say(conv, "nothing_to_cancel", "lost_authenticator")
            return
        if not confirmed:
            # The statistical router thinks so, but losing a case to a misread sentence would hurt: ask.
            self.say(conv, "cancel_confirm", "cancel_request", "case_status", case_id=case.id)
            return
        # Cancelling only ever makes an account safer, so the chat may do it without proof.
        self.cases.cancel(case.id, actor="customer", channel=conv.channel, reason="customer_cancelled")
        conv.stage = "idle"
