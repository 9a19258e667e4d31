"""Where this process's metrics are counted, without the domain knowing about Prometheus.

- Check outcomes and wrong email codes are read off what the unit of work writes (an identity check
  reaching a result, a case's count of wrong codes going up), through SQLAlchemy session events on the
  container's own session factory, and counted only once the transaction commits.
- Deliveries are counted by a wrapper around each outbox sender, which knows the channel it serves; web-chat
  replies, written in the dialog's own transaction, are counted when that transaction commits.
- Chat reply latency runs from a customer's message being stored to the first reply delivered to the
  same conversation.
"""
from __future__ import annotations

from sqlalchemy import event, inspect
from structlog.contextvars import unbind_contextvars

from bot.logs import bind_case
from bot.wakeup import inserted
from recovery.checks import PENDING
from recovery.models import Case, CaseCheck, ChatMessage
from recovery.outbox import Outgoing, PermanentFailure

_PENDING = "recoverybot_metrics_pending"
_MARKS = "recoverybot_metrics_marks"  # savepoint -> how many counts were pending when it began
# Set on a session by a sender whose delivery MeteredSender counts already (WebChatSender, which writes
# an outbox-queued reply into the transcript): the line it writes is not counted a second time.
METERED = "recoverybot_metered"
_CHAT_LINES = ChatMessage.__tablename__


def observe_sessions(sessionmaker, metrics) -> None:
    """Count check outcomes and wrong email codes written by sessions of `sessionmaker`."""

    @event.listens_for(sessionmaker, "after_flush")
    def _seen(session, _flush_context):
        pending = session.info.setdefault(_PENDING, [])
        for obj in list(session.new) + list(session.dirty):
            if isinstance(obj, CaseCheck):
                added = inspect(obj).attrs.result.history.added
                if added and added[-1] != PENDING:
                    pending.append(("check", obj.name, added[-1]))
            elif (isinstance(obj, ChatMessage) and obj in session.new and obj.sender == "bot"
                  and not session.info.get(METERED)):
                # a web-chat reply, written in the dialog's own transaction: delivered when it commits
                pending.append(("out", "webchat", "sent"))
            elif isinstance(obj, Case):
                history = inspect(obj).attrs.code_failures.history
                if history.added and history.deleted:
                    more = (history.added[-1] or 0) - (history.deleted[0] or 0)
                    if more > 0:
                        pending.append(("failure", "email_code_wrong", more))

    @event.listens_for(sessionmaker, "do_orm_execute")
    def _inserted(state):
        # web-chat replies written with a plain INSERT (bot/webchat.py), which no flush sees
        table, rows = inserted(state)
        if table != _CHAT_LINES or state.session.info.get(METERED):
            return
        for row in rows:
            if row.get("sender") == "bot":
                state.session.info.setdefault(_PENDING, []).append(("out", "webchat", "sent"))

    @event.listens_for(sessionmaker, "after_transaction_create")
    def _began(session, transaction):
        if transaction.nested:
            session.info.setdefault(_MARKS, {})[transaction] = len(session.info.get(_PENDING, ()))

    @event.listens_for(sessionmaker, "after_commit")
    def _committed(session):
        if session.in_nested_transaction():
            return  # a savepoint's release (SQLAlchemy calls this hook for it too): nothing is committed yet
        session.info.pop(_MARKS, None)
        for kind, name, value in session.info.pop(_PENDING, []):
            if kind == "check":
                metrics.check(name, value)
            elif kind == "out":
                metrics.delivered(name, value)
            else:
                metrics.failure(name, value)

    @event.listens_for(sessionmaker, "after_soft_rollback")
    def _rolled_back(session, previous):
        mark = session.info.get(_MARKS, {}).pop(previous, None)
        if previous.nested and mark is not None:
            # a savepoint rolled back: only what was counted inside it is undone
            del session.info.get(_PENDING, [])[mark:]
        else:
            session.info.pop(_PENDING, None)
            session.info.pop(_MARKS, None)


class MeteredSender:
    """Counts each delivery by channel (and emails by template), then re-raises what the sender raised.

    `channel` names the channel, or is a function of the message (chat messages go to the channel their
    conversation key names). A failure is "dead" when the dispatcher will not try again.
    """

    def __init__(self, sender, metrics, clock, *, channel, max_attempts: int):
        self.sender, self.metrics, self.clock = sender, metrics, clock
        self.channel, self.max_attempts = channel, max_attempts

    def send(self, message: Outgoing) -> None:
        channel = self.channel(message) if callable(self.channel) else self.channel
        # the case this message is about, on this delivery's log lines (the dispatcher's failure line too)
        unbind_contextvars("case_id")
        bind_case(message.payload.get("case_id") or message.payload.get("context", {}).get("case_id"))
        template = message.payload.get("template") if message.kind == "email" else None
        try:
            self.sender.send(message)
        except PermanentFailure:
            self.metrics.delivered(channel, "dead", template=template)
            raise
        except Exception:
            result = "dead" if message.attempt >= self.max_attempts else "retry"
            self.metrics.delivered(channel, result, template=template)
            raise
        self.metrics.delivered(channel, "sent", template=template)
        if message.kind == "chat":
            self.metrics.reply_delivered(message.payload["conversation"], channel, self.clock.now())

    def __getattr__(self, name):  # the wrapped sender's own attributes (e.g. ChatRouter.senders)
        return getattr(self.sender, name)


def chat_channel(message: Outgoing) -> str:
    return message.payload["conversation"].split(":", 1)[0]


def timed_handler(handler, metrics, clock):
    """Wrap an inbox handler so the worker notes when each customer message was stored (and, for the web
    chat, when its reply was written). `clock` returns the time now."""

    def handle(session, event, *prepared):
        if event.source != "slack":  # an approver's decision is not a customer waiting for a reply
            metrics.customer_message(event.conversation_key, event.received_at)
        result = handler(session, event, *prepared)
        if event.conversation_key.startswith("webchat:"):
            # The web chat's reply is written in this very transaction (recovery.notify.ChatWriter), so it
            # is delivered when the handler returns and the transaction commits, not by a sender.
            metrics.reply_delivered(event.conversation_key, "webchat", clock())
        return result

    for hook in ("prepare", "give_up", "delayed"):  # what recovery.inbox looks for on a handler
        if hasattr(handler, hook):
            setattr(handle, hook, getattr(handler, hook))
    return handle
