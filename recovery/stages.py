"""The conversation's stages and moves, declared once, like the case machine (recovery/machine.py).

A conversation's stage says what the bot last asked for; `move()` is the only code that changes it, and
refuses a move the table does not allow from the current stage. Every stage has a way out, offered as
buttons (`EXITS`): cancel while a case is open, use a different email, start over, talk to a person.
`ACTIONS` are the dialog's own buttons (not the router's intents): their labels, in every language, are
recognised here, anchored to the whole message, so only the tapped label or a plain equivalent acts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from recovery.models import Conversation


class Stage(StrEnum):
    IDLE = "idle"                # nothing asked
    AWAIT_EMAIL = "await_email"  # asked for the account's email address
    AWAIT_CODE = "await_code"    # a case is open; asked for the code emailed to the address on file
    AWAIT_FACT = "await_fact"    # the code passed; asked an account question
    WAITING = "waiting"          # the checks are done; the case is with the security team or later


S = Stage
ALL = frozenset(Stage)


class IllegalMove(RuntimeError):
    def __init__(self, event: str, stage: str):
        super().__init__(f"conversation move {event!r} is not allowed from stage {stage!r}")
        self.event, self.stage = event, stage


@dataclass(frozen=True)
class Move:
    event: str
    sources: frozenset[Stage]
    target: Stage


def _m(event: str, sources, target: Stage) -> Move:
    return Move(event, frozenset(sources), target)


MOVES: tuple[Move, ...] = (
    _m("ask_email",     {S.IDLE, S.AWAIT_EMAIL},                  S.AWAIT_EMAIL),
    _m("change_email",  {S.AWAIT_CODE, S.AWAIT_EMAIL},            S.AWAIT_EMAIL),
    _m("open_case",     {S.IDLE, S.AWAIT_EMAIL, S.AWAIT_CODE},    S.AWAIT_CODE),
    _m("code_passed",   {S.AWAIT_CODE},                           S.AWAIT_FACT),
    _m("checks_done",   {S.AWAIT_CODE, S.AWAIT_FACT},             S.WAITING),
    _m("resume_code",   {S.IDLE},                                 S.AWAIT_CODE),
    _m("resume_facts",  {S.IDLE},                                 S.AWAIT_FACT),
    _m("resume_waiting", {S.IDLE},                                S.WAITING),
    _m("start_over",    {S.IDLE, S.AWAIT_EMAIL, S.AWAIT_CODE, S.AWAIT_FACT}, S.IDLE),
    _m("case_ended",    ALL,                                      S.IDLE),
)
_BY_EVENT = {m.event: m for m in MOVES}

# The buttons that lead out of each stage (template blocks btn_<key>), offered with its questions.
EXITS: dict[Stage, tuple[str, ...]] = {
    S.IDLE: ("lost_authenticator", "talk_to_person"),
    S.AWAIT_EMAIL: ("start_over", "talk_to_person"),
    S.AWAIT_CODE: ("resend_code", "different_email", "cancel_request", "talk_to_person"),
    S.AWAIT_FACT: ("cancel_request", "talk_to_person"),
    S.WAITING: ("case_status", "cancel_request", "talk_to_person"),
}

# How many different addresses one conversation may try (the first included): enough for a typo and a
# second address, too few to spray reset emails at a list of strangers.
MAX_EMAILS = 3

# The dialog's own buttons, matched on the whole message (labels in every catalog, and plain words).
ACTIONS: tuple[tuple[str, re.Pattern], ...] = (
    ("start_over", re.compile(r"^\W*(?:start over|start again|restart|重新開始|從頭開始|重來)\W*$", re.I)),
    ("different_email", re.compile(
        r"^\W*(?:use (?:a )?(?:different|another|other) (?:email|address)|wrong email|change (?:my )?email|"
        r"改用其他電子郵件|換(?:一個)?(?:電子郵件|信箱|email)|信箱打錯了?|email打錯了?)\W*$", re.I)),
    ("dispute", re.compile(
        r"^\W*(?:it|that|this) (?:wasn'?t|was not) me\W*$|^\W*not me\W*$|^\W*(?:不是我|那不是我|不是我申請的)\W*$", re.I)),
)


def action(text: str) -> str | None:
    """The dialog action a message is (a tapped button or its plain words), or None."""
    for name, pattern in ACTIONS:
        if pattern.search(" ".join(text.split()).replace("’", "'")):
            return name
    return None


def allowed(event: str, stage: str) -> bool:
    m = _BY_EVENT.get(event)
    return m is not None and Stage(stage) in m.sources


def move(conv: Conversation, event: str) -> Stage:
    """Apply `event` to the conversation's stage; raise IllegalMove and change nothing."""
    m = _BY_EVENT.get(event)
    if m is None or Stage(conv.stage) not in m.sources:
        raise IllegalMove(event, conv.stage)
    conv.stage = m.target.value
    return m.target


def mermaid() -> str:
    """The stage diagram, generated from MOVES, as shown in docs/guidance.md."""
    lines = ["stateDiagram-v2", "    [*] --> idle"]
    for m in MOVES:
        for source in sorted(m.sources):
            lines.append(f"    {source.value} --> {m.target.value}: {m.event}")
    return "\n".join(lines)
