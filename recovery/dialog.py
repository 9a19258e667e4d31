"""The customer dialog, the same for every channel: a message in, message keys out (via the outbox).

Channels hand over plain text plus what they know of the contact; they render the keys with their
templates. The dialog never asks for a password, an authenticator code, a recovery code or a recovery
phrase: the only code it asks for is the one it emailed to the address on file. Whatever a customer
pastes, secrets are masked (recovery.redact) before anything is stored, and the customer is warned.

What the bot last asked for is the conversation's stage, declared with its moves and its ways out in
recovery/stages.py; every reply that asks something offers that stage's exits as buttons.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from recovery import limits, router, stages, timers
from recovery.cases import CODE_EXPIRED, CODE_LOCKED, CODE_OK, CODE_REJECTED
from recovery.links import LinkService
from recovery.checks import PASS
from recovery.deps import Deps
from recovery.errors import IllegalTransition, LimitReached
from recovery.machine import FINAL, OPEN, State
from recovery.models import Case, Conversation
from recovery.redact import CODE, EMAIL, MASKS, redact
from recovery.stages import EXITS, Stage

log = logging.getLogger(__name__)

CJK = re.compile(r"[\u3400-\u9fff]")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
RESEND = re.compile(r"resend|again|重寄|重新|再寄", re.I)
SEND_TO = re.compile(r"\b(?:send|mail|e-?mail (?:it|the)|forward|to)\b|寄|給|轉", re.I)

SEVERE = ("recovery_phrase", "private_key", "recovery_code", "password")  # warned about, turn ends
MENU = ("lost_authenticator", "what_is_2fa", "code_rejected", "new_phone")
# Each intent's quick-reply button (template block btn_<key>); its label routes back to the intent.
BUTTON = {"start_recovery": "lost_authenticator", "cancel": "cancel_request"} | {
    i: i for i in router.TOPICS + ("talk_to_person", "case_status")}
# What a clarifying question may offer: the router's intents' buttons, and the dialog's own dispute
# button (recovery/stages.py recognises its label, whatever the router makes of it).
OFFER = BUTTON | {"dispute": "dispute"}
# A scam report or a disputed request is answered even when the message also asks for a person: the
# answer tells them how to stop it now, which a queue for a person cannot.
URGENT = ("dispute", "safety")
# What a customer may ask about while the bot waits for the emailed code: answered, then reminded.
ASIDES = router.TOPICS + ("dispute", "thanks", "case_status")
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


def _known_locale(locale: str | None) -> str:
    """A language the conversation can be held in; English for anything else."""
    return locale if locale in ("en", "zh-TW") else "en"


class Dialog:
    def __init__(self, session: Session, deps: Deps):
        self.s, self.deps = session, deps
        self.cases = LinkService(session, deps)
        self.now = self.cases.now

    def _conversation(self, msg: Incoming) -> Conversation:
        conv = self.s.get(Conversation, msg.conversation_key, with_for_update=True)
        if conv is None:
            conv = Conversation(key=msg.conversation_key, channel=msg.channel,
                                locale=_known_locale(msg.locale),
                                stage=Stage.IDLE.value, data={}, created_at=self.now, updated_at=self.now)
            self.s.add(conv)
        return conv

    def not_handled(self, conversation_key: str, turn: str, locale: str | None = None) -> None:
        """A customer's message failed for the last time (recovery.inbox gave up on it): say so, rather
        than leave them waiting for a reply that will never come. Keyed by the turn, so said once."""
        self._about_turn(conversation_key, turn, locale, "not_handled")

    def delayed(self, conversation_key: str, turn: str, locale: str | None = None) -> None:
        """A customer's message waits for a service that did not answer (recovery.inbox tries it again in
        seconds to minutes): say so once, so they neither wait in silence nor send it again."""
        self._about_turn(conversation_key, turn, locale, "delayed")

    def _about_turn(self, conversation_key: str, turn: str, locale: str | None, message: str) -> None:
        conv = self.s.get(Conversation, conversation_key)
        if conv is not None:
            locale = conv.locale
        self.cases.notify.chat(None, conversation_key, message, locale=_known_locale(locale),
                               key=f"{conversation_key}:{turn}:{message.replace('_', '-')}")

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
        self._sync(conv)
        if not self._warned(conv, masked.kinds) and not self._resumed(conv, msg):
            self._respond(conv, msg, msg.text.strip())
        conv.updated_at = self.now
        return TurnResult(masked.text, masked.kinds)

    def intent(self, msg: Incoming, intent: str, turn: str) -> None:
        """React to an intent the channel already knows (a button that carries its intent, or a caller
        that understood the text itself), from whatever stage the conversation is in."""
        self._turn, self._n = turn, 0
        conv = self._conversation(msg)
        self._sync(conv)
        self._do(conv, msg, intent)
        conv.updated_at = self.now

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
        self._sync(conv)
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
        # Every teammate who starts a recovery here stays on record for the conversation: a customer who then
        # switches address opens another case, started by that teammate all the same (CaseService.initiators).
        known = (conv.data or {}).get("initiators", [])
        self._remember(conv, initiator=initiator, initiators=known + [initiator] * (initiator not in known))
        conv.case_id = None
        if conv.stage != Stage.IDLE:
            stages.move(conv, "start_over")
        if email:
            self._open(conv, email, opened_by=initiator, verified_account_id=None)
            self.note(conv, "staff_started", initiator=initiator, case_id=conv.case_id)
            return
        stages.move(conv, "ask_email")
        self.say(conv, "staff_ask_email", *EXITS[Stage.AWAIT_EMAIL])
        self.note(conv, "staff_asked_email", initiator=initiator)

    # ---- safety and language -------------------------------------------------------------------------

    def _warned(self, conv: Conversation, kinds: tuple[str, ...]) -> bool:
        """Warn about pasted secrets; True when the turn ends here. A code is expected only where the bot
        asked for one (the emailed code) or asked a question a number may answer."""
        severe = [k for k in kinds if k in SEVERE]
        if severe:
            self.say(conv, "secret_warning", "lost_authenticator", "safety", kinds=severe)
            return True
        if "code" in kinds and conv.stage not in (Stage.AWAIT_CODE, Stage.AWAIT_FACT):
            case = self._current_case(conv)
            if case is not None and State(case.state) in FINAL:
                # The bot asked for a code in this chat; say why it no longer wants one, not "never send codes".
                self.say(conv, "code_not_expected", "lost_authenticator", "talk_to_person", case_id=case.id)
            else:
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
        action = stages.action(text)
        command = router.command(text) if action is None else None
        if command == "talk_to_person":
            routing = router.route(text)
            if routing.intent in URGENT and not routing.unsure:
                command = routing.intent  # a scam report that mentions an agent is still a scam report
        if action is not None:  # one of the dialog's own buttons, from any stage
            self._action(conv, msg, action)
        elif command is not None:  # unmistakable: it interrupts whatever was asked
            self._do(conv, msg, command, confirmed=True)
        elif conv.stage == Stage.AWAIT_CODE:
            self._code(conv, msg, text)
        elif conv.stage == Stage.AWAIT_FACT:
            self._fact(conv, text)  # whatever it says is the answer, checked like any other
        elif conv.stage == Stage.AWAIT_EMAIL and EMAIL.search(text):
            self._email(conv, msg, text)
        else:
            routing = router.route(text)
            off_topic = routing.unsure or routing.intent in ("something_else", "greeting")
            if conv.stage == Stage.AWAIT_EMAIL and off_topic:
                self.say(conv, "bad_email", *EXITS[Stage.AWAIT_EMAIL])
            elif routing.unsure:
                self._unsure(conv, msg, routing, misses + 1)
            else:
                self._do(conv, msg, routing.intent)

    def _action(self, conv: Conversation, msg: Incoming, action: str) -> None:
        {"start_over": lambda: self._start_over(conv), "different_email": lambda: self._change_email(conv, msg, None),
         "dispute": lambda: self._dispute(conv)}[action]()

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
        elif intent == "dispute":
            self._dispute(conv)
        elif intent == "thanks":
            self._thanks(conv)
        elif intent in router.TOPICS:
            self.say(conv, intent, *FOLLOW_UPS[intent], **self._guidance_context())
        elif intent == "greeting":
            self.say(conv, "menu", *MENU)
        else:
            self.say(conv, "something_else", "lost_authenticator", "what_is_2fa", "talk_to_person")

    def _unsure(self, conv: Conversation, msg: Incoming, routing: router.Routing, misses: int) -> None:
        """Ask rather than guess; a second miss in a row goes to a person, unless it may be a scam report
        or a disputed request, whose answer says how to stop it at once."""
        if misses >= 2:
            urgent = next((i for i in routing.candidates if i in URGENT), None)
            if urgent is not None:
                self._do(conv, msg, urgent)
            else:
                self._handover(conv, "bot_unsure")
            return
        self._remember(conv, unsure=misses)
        offered = [OFFER[i] for i in routing.candidates if i in OFFER and i != "talk_to_person"][:3]
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

    def _sync(self, conv: Conversation) -> None:
        """Catch the stage up with the case, which moves on its own (approvals, timers, links)."""
        if conv.stage == Stage.IDLE or (conv.stage == Stage.AWAIT_EMAIL and not conv.case_id):
            return
        case = self._current_case(conv)
        if case is None or State(case.state) in FINAL:
            stages.move(conv, "case_ended")
        elif case.state != State.VERIFYING and conv.stage in (Stage.AWAIT_CODE, Stage.AWAIT_FACT):
            stages.move(conv, "checks_done")

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
        if conv.stage != Stage.IDLE:
            stages.move(conv, "start_over")  # whatever it asked before gives way to the case
        self.say(conv, "case_resumed", case_id=case.id)
        if case.state != State.VERIFYING:
            stages.move(conv, "resume_waiting")
            self._status(conv)
        elif self.cases.check(case, "email_code").result == PASS:
            stages.move(conv, "resume_facts")
            self._ask_next(conv, case)
        else:
            stages.move(conv, "resume_code")
            self.say(conv, "ask_code", *EXITS[Stage.AWAIT_CODE])
        return True

    # ---- the recovery steps ---------------------------------------------------------------------------------

    def _start(self, conv: Conversation) -> None:
        case = self._current_case(conv)
        if case is not None and State(case.state) not in FINAL:
            self._status(conv)
            return
        conv.case_id = None
        stages.move(conv, "ask_email")
        self.say(conv, "ask_email", *EXITS[Stage.AWAIT_EMAIL])

    def _email(self, conv: Conversation, msg: Incoming, text: str) -> None:
        match = EMAIL.search(text)
        if self._emails_left(conv) <= 0:
            self.say(conv, "email_limit", "talk_to_person", limit=stages.MAX_EMAILS)
            return
        p = self.deps.policy
        if not self._allowed(msg, "open", per_contact=p.case_starts_per_contact_per_hour,
                             per_ip=p.case_starts_per_ip_per_hour):
            self.say(conv, "rate_limited", *EXITS[Stage(conv.stage)])
            return
        self._remember(conv, emails=(conv.data or {}).get("emails", 0) + 1)
        self._open(conv, match.group(0), opened_by=(conv.data or {}).get("initiator") or "customer",
                   verified_account_id=msg.verified_account_id, ip=msg.ip)

    @staticmethod
    def _another_address(text: str) -> bool:
        """An address typed on its own ("alex@example.com", "sorry, it's alex@example.com") is a new
        address to try; one inside a request to mail something there ("send it to ...") is not: codes
        and links only ever go to the address on file."""
        found = EMAIL.search(text)
        if found is None:
            return False
        rest = text[:found.start()] + " " + text[found.end():]
        return len(rest.split()) <= 3 and not SEND_TO.search(rest)

    @staticmethod
    def _emails_left(conv: Conversation) -> int:
        return stages.MAX_EMAILS - (conv.data or {}).get("emails", 0)

    def _open(self, conv: Conversation, email: str, *, opened_by: str, verified_account_id: str | None,
              ip: str | None = None) -> None:
        case = self.cases.open(conversation_key=conv.key, channel=conv.channel, email=email, locale=conv.locale,
                               opened_by=opened_by, verified_account_id=verified_account_id, request_ip=ip)
        conv.case_id = case.id
        stages.move(conv, "open_case")
        # The same words whether or not the address is registered (no account enumeration).
        self.say(conv, "code_sent", *EXITS[Stage.AWAIT_CODE], minutes=self.deps.policy.code_ttl_minutes)

    def _allowed(self, msg: Incoming, what: str, *, per_contact: int, per_ip: int) -> bool:
        window = timedelta(hours=1)
        ok = limits.allow(self.s, f"{what}:contact:{msg.conversation_key}", now=self.now, limit=per_contact,
                          window=window)
        if ok and msg.ip:
            ok = limits.allow(self.s, f"{what}:ip:{msg.ip}", now=self.now, limit=per_ip, window=window)
        return ok

    def _code(self, conv: Conversation, msg: Incoming, text: str) -> None:
        case = self._current_case(conv)
        if RESEND.search(text):
            try:
                self.cases.resend_code(case.id)
                self.say(conv, "code_resent", minutes=self.deps.policy.code_ttl_minutes)
            except LimitReached:
                self.say(conv, "resend_limit")
            return
        match = CODE.search(text)
        if not match and self._another_address(text):
            self._change_email(conv, msg, text)  # the first one was mistyped, or not the one on file
            return
        if not match:
            routing = router.route(text)
            if not routing.unsure and routing.intent in ASIDES:
                self._do(conv, msg, routing.intent)  # answered; the code can still be typed next
            else:
                self.say(conv, "ask_code", *EXITS[Stage.AWAIT_CODE])
            return
        p = self.deps.policy
        if not self._allowed(msg, "code", per_contact=p.attempts_per_contact_per_hour,
                             per_ip=p.attempts_per_ip_per_hour):
            self.say(conv, "rate_limited", *EXITS[Stage.AWAIT_CODE])
            return
        outcome = self.cases.submit_code(case.id, re.sub(r"\D", "", match.group(0)))
        if outcome.status == CODE_OK:
            self._ask_next(conv, case, first=True)
        elif outcome.status == CODE_EXPIRED:
            self.say(conv, "code_expired", *EXITS[Stage.AWAIT_CODE])
        elif outcome.status in (CODE_LOCKED, CODE_REJECTED):
            stages.move(conv, "case_ended")  # the case's own closing message follows
        else:
            self.say(conv, "code_wrong", *EXITS[Stage.AWAIT_CODE], remaining=outcome.remaining)

    def _ask_next(self, conv: Conversation, case, first: bool = False) -> None:
        question = self.cases.next_question(case)
        if question is None:
            stages.move(conv, "checks_done")
            self.say(conv, "checks_done", *EXITS[Stage.WAITING], **self._status_context(case))
            return
        if conv.stage == Stage.AWAIT_CODE:
            stages.move(conv, "code_passed")
        self.say(conv, "ask_fact", *EXITS[Stage.AWAIT_FACT], fact=question, first=first)

    def _fact(self, conv: Conversation, text: str) -> None:
        case = self._current_case(conv)
        try:
            self.cases.answer_fact(case.id, text)
        except IllegalTransition:  # the case moved on between the question and this answer
            self._sync(conv)
            self._status(conv)
            return
        self._ask_next(conv, case)

    def _status(self, conv: Conversation) -> None:
        case = self._current_case(conv)
        if case is None:
            self.say(conv, "no_case", "lost_authenticator", "dispute", "talk_to_person")
        else:
            self.say(conv, "case_status", *EXITS[Stage(conv.stage)], **self._status_context(case))

    def _status_context(self, case: Case) -> dict:
        """What the status and review messages tell: the state, the next step and when it is due."""
        p = self.deps.policy
        due = {t.kind: t.due_at for t in timers.pending(self.s, case.id)}
        rule = p.rule(case.risk_level) if case.risk_level else None
        context = {"state": case.state, "case_id": case.id,
                   "hold_until": case.hold_until.isoformat() if case.hold_until else None}
        if case.state == State.VERIFYING:
            passed = (self.cases.check(case, "email_code") or None)
            context |= {"due": due.get("verifying_expiry"),
                        "step": "facts" if passed is not None and passed.result == PASS else "code"}
        elif case.state == State.AWAITING_APPROVAL:
            context |= {"due": due.get("approval_expiry"), "review_hours": math.ceil(p.approval_escalation_minutes / 60)}
        elif case.state == State.APPROVED:
            context |= {"due": due.get("notice_window")}
        elif case.state == State.LINK_SENT:
            context |= {"due": due.get("link_expiry")}
        if rule is not None:
            context |= {"notice_hours": rule.notice_hours, "hold_hours": rule.hold_hours}
        if context.get("due") is not None:
            context["due"] = context["due"].isoformat()  # the context travels as JSON (outbox)
        return context

    def _cancel(self, conv: Conversation, *, confirmed: bool) -> None:
        case = self._current_case(conv)
        if case is None or State(case.state) in FINAL:
            if conv.stage == Stage.AWAIT_EMAIL:
                stages.move(conv, "start_over")  # nothing opened yet: just stop asking for the address
            # Never "there is no request": the owner of an account may be writing from a chat of their
            # own, and the request they want stopped is in our email to them.
            self.say(conv, "nothing_to_cancel", "lost_authenticator", "talk_to_person")
            return
        if not confirmed:
            # The statistical router thinks so, but losing a case to a misread sentence would hurt: ask.
            self.say(conv, "cancel_confirm", "cancel_request", "case_status", case_id=case.id)
            return
        self._drop_case(conv, case)

    def _drop_case(self, conv: Conversation, case: Case) -> None:
        """Cancel this conversation's open case at the customer's word. Cancelling only ever makes an
        account safer, so the chat may do it without proof; the case's own closing message follows."""
        self.cases.cancel(case.id, actor="customer", channel=conv.channel, reason="customer_cancelled")
        stages.move(conv, "case_ended")

    # ---- ways out ---------------------------------------------------------------------------------------

    def _open_case(self, conv: Conversation) -> Case | None:
        case = self._current_case(conv)
        return case if case is not None and State(case.state) not in FINAL else None

    def _start_over(self, conv: Conversation) -> None:
        if not stages.allowed("start_over", conv.stage):  # past the checks: only cancel stops the case
            self._status(conv)
            return
        case = self._open_case(conv)
        if case is not None:
            self._drop_case(conv, case)
        else:
            stages.move(conv, "start_over")
        conv.case_id = None
        self.say(conv, "started_over", *MENU[:2], "talk_to_person")

    def _change_email(self, conv: Conversation, msg: Incoming, text: str | None) -> None:
        """Leave a code step for another address: the open case stops (its owner, if any, is told), and
        the new address starts a case of its own, within the conversation's limit of addresses."""
        if not stages.allowed("change_email", conv.stage):
            if conv.stage == Stage.IDLE:
                self._start(conv)
            else:
                self._status(conv)  # the address already proved right
            return
        if self._emails_left(conv) <= 0:
            self.say(conv, "email_limit", "talk_to_person", *(("cancel_request",) if conv.case_id else ()),
                     limit=stages.MAX_EMAILS)
            return
        case = self._open_case(conv)
        if case is not None:
            self._drop_case(conv, case)
            conv.case_id = None
            stages.move(conv, "ask_email")
        else:
            stages.move(conv, "change_email")
        if text is not None:
            self._email(conv, msg, text)
        else:
            self.say(conv, "ask_other_email", *EXITS[Stage.AWAIT_EMAIL])

    def _dispute(self, conv: Conversation) -> None:
        """Someone says a request was not theirs: how to stop it, whatever this conversation holds."""
        case = self._open_case(conv)
        buttons = (("cancel_request",) if case is not None else ()) + ("safety", "talk_to_person")
        self.say(conv, "dispute", *buttons, case_id=case.id if case is not None else None)

    def _thanks(self, conv: Conversation) -> None:
        case = self._open_case(conv)
        self.say(conv, "thanks", case_id=case.id if case is not None else None)
