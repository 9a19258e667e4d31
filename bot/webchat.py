"""The built-in web chat: a page at /chat and its JSON API (a contract other tools rely on).

POST /chat/api/sessions                      -> 201 {"session_id", "messages"}
POST /chat/api/sessions/{id}/messages {text[, client_id][, after[, wait]]}
                                             -> 202 {"accepted", "duplicate"[, "messages"]} (stored in the
     inbox; the worker replies). With "after": N, "messages" holds the transcript after N, this
     message's own (redacted) line included, as a poll would. With "wait": S as well (0 to 20 seconds)
     and nothing yet after the customer's last line, the answer waits for the next line (the reply), as
     a waiting poll does, so the page needs no poll of its own for the reply.
GET  /chat/api/sessions/{id}/messages?after=N[&wait=S]
                                             -> {"messages": [{"seq", "sender", "text", "buttons"}]}
     wait=S (0 to 20 seconds, default 0): with nothing after N yet, answer when something is written,
     or after S seconds with an empty list (bot/chatwait.py)
"""
from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from contextlib import ExitStack

from babel import Locale
from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import and_, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError

from bot import wakeup
from bot.chatwait import MAX_WAIT
from bot.http import ApiError, json_body, storable_text
from bot.instrument import METERED
from recovery import inbox
from recovery.db import is_outage
from recovery.redact import redact_text
from recovery.models import ChatMessage, ChatSession
from recovery.outbox import Outgoing, PermanentFailure

MAX_TEXT = 2000
log = logging.getLogger(__name__)
MAX_PAGE = 200
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what create_session issues
SEQ = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and within a 64-bit column
WAIT = re.compile(r"[0-9]{1,2}")

bp = Blueprint("webchat", __name__)


def _c():
    return current_app.extensions["recoverybot"]


def _message_json(m) -> dict:
    """A transcript line as the chat API gives it, from a ChatMessage or a row with the same columns."""
    return {"seq": m.seq, "sender": m.sender, "text": m.text, "buttons": m.buttons or []}


# What a language link posts to switch the bot's replies too (the router knows these words).
LANGUAGE_SWITCH = {"en": "English", "zh-TW": "中文"}


def request_locale(renderer) -> str:
    """The page's language: ?lang= when given, else the browser's preference among those offered."""
    asked = request.args.get("lang")
    if asked:
        return renderer.pick(asked)
    offered = list(renderer.locales) + [loc.split("-")[0] for loc in renderer.locales]
    return renderer.pick(request.accept_languages.best_match(offered) or "en")


@bp.get("/chat")
def page():
    c = _c()
    names = {loc: Locale.parse(loc.replace("-", "_")).get_display_name(loc.replace("-", "_"))
             for loc in c.renderer.locales}
    return c.renderer.page("chat", request_locale(c.renderer), language_names=names,
                           language_switch=LANGUAGE_SWITCH)


@bp.post("/chat/api/sessions")
def create_session():
    c = _c()
    body = json_body(optional=True)
    locale = body.get("locale", "en")
    if not isinstance(locale, str):
        raise ApiError(400, "bad_locale", "locale must be a string such as 'en' or 'zh-TW'")
    locale = c.renderer.pick(locale)
    session_id = secrets.token_urlsafe(18)
    now = c.clock.now()
    with c.db.transaction() as s:
        s.add(ChatSession(id=session_id, locale=locale, created_at=now))
        greeting = ChatMessage(session_id=session_id, sender="bot", text=c.renderer.chat("menu", locale),
                               buttons=_buttons(c.renderer, locale, ["lost_authenticator", "what_is_2fa"]),
                               created_at=now)
        s.add(greeting)
        s.flush()
        messages = [_message_json(greeting)]
    return jsonify(session_id=session_id, messages=messages), 201


@bp.post("/chat/api/sessions/<session_id>/messages")
def post_message(session_id: str):
    c = _c()
    body = json_body()
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "bad_text", 'send {"text": "..."} with a non-empty string')
    if not storable_text(text):
        raise ApiError(400, "bad_text", "text must be valid Unicode without NUL characters")
    if len(text) > MAX_TEXT:
        raise ApiError(413, "text_too_long", f"a message may have at most {MAX_TEXT} characters")
    client_id = body.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not 1 <= len(client_id) <= 100
                                  or not storable_text(client_id)):
        raise ApiError(400, "bad_client_id",
                       "client_id must be a string of 1 to 100 characters (valid Unicode, no NUL)")
    after = body.get("after")
    if after is not None and (type(after) is not int or not 0 <= after < 2**63):
        raise ApiError(400, "bad_after", "after must be a non-negative whole number (a seq)")
    wait = body.get("wait")
    wait = 0 if wait is None else wait  # null is "not given", as for after
    if type(wait) is not int or not 0 <= wait <= MAX_WAIT:
        raise ApiError(400, "bad_wait", f"wait must be a whole number of seconds from 0 to {MAX_WAIT}")
    if wait and after is None:
        raise ApiError(400, "bad_wait", "wait needs after: the last seq the page has shown")
    if not SESSION_ID.fullmatch(session_id):
        raise ApiError(404, "unknown_session", "no chat session with that id; create one first")
    now = c.clock.now()
    conversation = f"webchat:{session_id}"
    delivery_key = f"{conversation}:{client_id or uuid.uuid4().hex}"
    # Sealed and redacted before the transaction: on SQLite every write waits for the one before it.
    sealed, redacted = c.keyring.encrypt(text), redact_text(text)
    with ExitStack() as waiting:
        with c.db.transaction() as s:
            # Locking the session row orders this session's inserts, so `seq` follows commit order
            # and a poller reading `seq > after` cannot skip a message that commits late.
            locale = s.execute(_LOCK, {"session_id": session_id}).scalar()
            if locale is None:
                raise ApiError(404, "unknown_session", "no chat session with that id; create one first")
            # The transcript keeps a redacted copy; the inbox keeps the text encrypted until processed.
            stored = inbox.add(s, source="webchat", delivery_key=delivery_key, conversation_key=conversation,
                               now=now, payload={"session_id": session_id, "text_enc": sealed,
                                                 "ip": request.remote_addr, "locale": locale})
            if stored:
                s.execute(_ADD_LINE, {"session_id": session_id, "sender": "customer", "text": redacted,
                                      "buttons": [], "created_at": now})
            if after is None:
                lines = written = None
            else:
                # Read under the session's lock, so nothing of this session can commit in between unseen.
                lines = [r for r in s.execute(_PAGE, {"session_id": session_id, "after": after})
                         if r.seq is not None]
                written, mark = None, (lines[-1].seq if lines else after)
                if wait and (not lines or lines[-1].sender == "customer") and len(lines) < MAX_PAGE:
                    # Nothing after the customer's last line yet: the answer waits for the next line (the
                    # reply). Watching starts under the lock, before anything else of this session can
                    # commit, and a commit does not wake its own thread's watches (bot/chatwait.py), so
                    # in this process it need not look again before it waits.
                    deadline = time.monotonic() + wait
                    written = waiting.enter_context(
                        c.chat_waiters.watching(session_id, mark, request.remote_addr or ""))
        # The commit woke this process's worker (bot/wakeup.py) and, on PostgreSQL, notified the others.
        c.metrics.inbox("webchat", "stored" if stored else "duplicate")
        if lines is None:
            return jsonify(accepted=True, duplicate=not stored), 202
        if written is not None:
            try:
                lines += [r for r in _watch(c, written, {"session_id": session_id, "after": mark}, deadline,
                                            looked=True) if r.seq is not None]
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # The message is stored: a 503 would tell the client to send it again. The reply comes
                # to the page's next poll.
                log.warning("a posted message's wait for its reply lost the database (%s)", type(exc).__name__)
    # What the page has not seen yet, this message's own (redacted) line included; with `wait`, the reply
    # as well: one request per message instead of a POST and a waiting poll.
    return jsonify(accepted=True, duplicate=not stored, messages=[_message_json(r) for r in lines]), 202


@bp.get("/chat/api/sessions/<session_id>/messages")
def list_messages(session_id: str):
    c = _c()
    after = request.args.get("after", "0")
    if not SEQ.fullmatch(after):
        raise ApiError(400, "bad_after", "after must be a non-negative whole number (a seq)")
    wait = request.args.get("wait", "0")
    if not WAIT.fullmatch(wait) or int(wait) > MAX_WAIT:
        raise ApiError(400, "bad_wait", f"wait must be a whole number of seconds from 0 to {MAX_WAIT}")
    if not SESSION_ID.fullmatch(session_id):
        raise ApiError(404, "unknown_session", "no chat session with that id")
    after, wait = int(after), int(wait)
    if not wait:
        return _page(_read(c, {"session_id": session_id, "after": after}))
    return _page(_wait_for_lines(c, session_id, after, wait))


def _wait_for_lines(c, session_id: str, after: int, wait: int) -> list:
    """The transcript past `after` (the rows of _PAGE) once there is something, or after `wait` seconds;
    at once when the process already has as many waiting requests as it allows (bot/chatwait.py)."""
    deadline = time.monotonic() + wait
    # Watching starts before the first read, so a message committed between the read and the wait
    # still wakes this request.
    with c.chat_waiters.watching(session_id, after, request.remote_addr or "") as written:
        return _watch(c, written, {"session_id": session_id, "after": after}, deadline)


def _watch(c, written, params: dict, deadline: float, *, looked: bool = False) -> list:
    """Read the page `params` name until it has something, `deadline` (time.monotonic) passes, or at once
    when `written` is None (no room to wait). `looked`: the caller has already found nothing since
    `written` was set up, so the first thing to do is wait. No database connection is held meanwhile."""
    while True:
        if looked and written is not None and (left := deadline - time.monotonic()) > 0:
            written.wait(min(c.chat_waiters.recheck, left))
            written.clear()
        rows = _read(c, params)
        if written is None or not rows or rows[0].seq is not None or deadline <= time.monotonic():
            return rows
        looked = True


def _read(c, params: dict) -> list:
    with c.db.reading() as s:
        return s.execute(_PAGE, params).all()


def _page(rows: list):
    if not rows:
        raise ApiError(404, "unknown_session", "no chat session with that id")
    return jsonify(messages=[_message_json(r) for r in rows if r.seq is not None])


# A poll in one statement, built once: the session's row outer-joined to its messages after `after`
# (no row: no such session; one row of NULLs: nothing new). Open chat pages poll every second, and two
# ORM look-ups cost two round trips and about twice the CPU.
_PAGE = (select(ChatSession.id, ChatMessage.seq, ChatMessage.sender, ChatMessage.text, ChatMessage.buttons)
         .select_from(ChatSession)
         .outerjoin(ChatMessage, and_(ChatMessage.session_id == ChatSession.id,
                                      ChatMessage.seq > bindparam("after")))
         .where(ChatSession.id == bindparam("session_id"))
         .order_by(ChatMessage.seq).limit(MAX_PAGE))


# Statements built once for the customer's line (and _ADD_LINE for the bot's too): an ORM look-up and
# flush cost the route a third more CPU, and on SQLite that time is spent holding the one write lock.
_LOCK = select(ChatSession.locale).where(ChatSession.id == bindparam("session_id")).with_for_update()
_ADD_LINE = insert(ChatMessage.__table__)  # bot/wakeup.py notes the session from its parameters
# The worker's lock on PostgreSQL, with the NOTIFY for the session's waiting requests (WebChatTranscript).
_LOCK_AND_NOTIFY = (select(ChatSession.id, func.pg_notify(wakeup.CHAT_CHANNEL, bindparam("payload")))
                    .where(ChatSession.id == bindparam("session_id")).with_for_update())


def _buttons(renderer, locale: str, keys) -> list[dict]:
    return [{"label": label, "text": label} for label in (renderer.button(k, locale) for k in keys)]


class WebChatTranscript:
    """Writes bot replies for `webchat:` conversations into the transcript, inside the dialog's own
    transaction (recovery.notify.ChatWriter): there is nothing to send, so nothing to queue."""

    def __init__(self, renderer):
        self.renderer = renderer

    def write(self, session, *, conversation: str, message: str, locale: str, buttons: list[str],
              context: dict, key: str, now) -> None:
        """No check for an earlier copy: the reply commits with what caused it (the turn, the case change),
        so it cannot have been written before; `source_key` is unique all the same."""
        session_id = conversation.split(":", 1)[1]
        if session.get_bind().dialect.name == "postgresql":
            # The lock: see post_message (SQLite's writers already run one at a time). The same statement
            # queues the NOTIFY that wakes this session's waiting polls in other processes (PostgreSQL
            # sends it at commit), so the turn needs no statement of its own for it.
            session.execute(_LOCK_AND_NOTIFY,
                            {"session_id": session_id, "payload": wakeup.tagged(session_id, session.get_bind())})
            wakeup.announced(session, session_id)
        # A plain INSERT, as the route's: a unit-of-work flush of the line cost the turn a tenth of its time.
        # Nothing it writes depends on what the turn has pending, so it does not flush that first: one
        # flush per turn (at the commit) instead of two, the same statements.
        with session.no_autoflush:
            session.execute(_ADD_LINE, {"session_id": session_id, "sender": "bot",
                                        "text": self.renderer.chat(message, locale, context),
                                        "buttons": _buttons(self.renderer, locale, buttons), "source_key": key,
                                        "message_key": message[:48], "created_at": now})


class WebChatSender:
    """Delivers web-chat replies that were queued in the outbox (by a version that queued them)."""

    def __init__(self, db, renderer, clock):
        self.db, self.transcript, self.clock = db, WebChatTranscript(renderer), clock

    def send(self, message: Outgoing) -> None:
        p = message.payload
        try:
            with self.db.transaction() as s:
                s.info[METERED] = True  # MeteredSender counts this delivery; the line is not counted again
                # an outbox message can be sent twice (a lease that ran out mid-send): once is enough
                if s.scalar(select(ChatMessage.seq).where(ChatMessage.source_key == message.idempotency_key)):
                    return
                self.transcript.write(s, conversation=p["conversation"], message=p["message"],
                                      locale=p["locale"], buttons=p.get("buttons", []),
                                      context=p.get("context", {}), key=message.idempotency_key,
                                      now=self.clock.now())
        except IntegrityError:
            return  # delivered by a racing attempt


class ChatRouter:
    """Routes a chat message to its channel by the conversation key's prefix."""

    def __init__(self, senders: dict):
        self.senders = senders

    def send(self, message: Outgoing) -> None:
        prefix = message.payload["conversation"].split(":", 1)[0]
        sender = self.senders.get(prefix)
        if sender is None:
            raise PermanentFailure(f"no channel for conversation prefix {prefix!r}")
        sender.send(message)
