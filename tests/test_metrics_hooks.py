"""Counts read off what a unit of work writes (bot/instrument.py) follow the transaction: nothing is
counted before the real commit, a savepoint that rolls back undoes only its own counts, and a delivery
that MeteredSender counts is not counted again by the line it writes."""
from __future__ import annotations

import pytest

from recovery.models import ChatMessage, ChatSession
from recovery.outbox import enqueue

SENT = ("recoverybot_messages_out_total", {"channel": "webchat", "result": "sent"})


def sent(c) -> float:
    return c.metrics.registry.get_sample_value(*SENT) or 0.0


def bot_line(c, s, sid: str, text: str, *, plain: bool) -> None:
    if plain:  # as WebChatTranscript writes a reply
        s.execute(ChatMessage.__table__.insert(), {"session_id": sid, "sender": "bot", "text": text, "buttons": [],
                                                   "created_at": c.clock.now()})
    else:  # as the greeting is written
        s.add(ChatMessage(session_id=sid, sender="bot", text=text, buttons=[], created_at=c.clock.now()))


@pytest.mark.parametrize("plain", [True, False], ids=["plain INSERT", "ORM object"])
def test_a_reply_is_counted_at_the_commit_and_a_savepoint_undoes_only_its_own(sqlite_url, make_container, plain):
    c = make_container(sqlite_url)
    with c.db.transaction() as s:
        s.add(ChatSession(id="S-m", locale="en", created_at=c.clock.now()))
    before = sent(c)

    # written inside a savepoint that is released, then the whole transaction fails: nothing counted
    with pytest.raises(ZeroDivisionError):
        with c.db.transaction() as s:
            with s.begin_nested():
                bot_line(c, s, "S-m", "one", plain=plain)
            assert sent(c) == before  # released, not committed
            1 / 0
    assert sent(c) == before

    # one line outside a savepoint, one inside a savepoint that rolls back: one counted
    with c.db.transaction() as s:
        bot_line(c, s, "S-m", "two", plain=plain)
        with pytest.raises(ZeroDivisionError):
            with s.begin_nested():
                bot_line(c, s, "S-m", "three", plain=plain)
                s.flush()
                1 / 0
    assert sent(c) == before + 1


def test_a_reply_queued_in_the_outbox_is_counted_once_when_delivered(sqlite_url, make_container):
    """A web-chat reply an earlier release queued in the outbox: MeteredSender counts its delivery, and
    the transcript line WebChatSender writes is not counted again."""
    c = make_container(sqlite_url)
    with c.db.transaction() as s:
        s.add(ChatSession(id="S-q", locale="en", created_at=c.clock.now()))
        enqueue(s, c.keyring, kind="chat", key="q-1", now=c.clock.now(),
                payload={"conversation": "webchat:S-q", "message": "menu", "locale": "en"})
    before = sent(c)
    assert c.worker.dispatcher.run_once(10, None) == 1
    assert sent(c) == before + 1
    with c.db.reading() as s:
        assert s.query(ChatMessage).filter_by(session_id="S-q", sender="bot").count() == 1


def test_a_scrape_takes_no_write_turn(sqlite_url, make_container):
    """The retention figures are read in a read-only unit of work: a scrape made while this thread holds
    SQLite's write turn answers with them (it used to wait for the turn, here for itself, until the busy
    timeout, and then left them out)."""
    c = make_container(sqlite_url)
    with c.db.transaction() as s:
        s.add(ChatSession(id="S-w", locale="en", created_at=c.clock.now()))
        s.flush()  # this thread now holds the write turn
        assert c.metrics.registry.get_sample_value("recoverybot_purge_runs_total") is not None
