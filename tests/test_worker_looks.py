"""Between its regular looks (every WORKER_IDLE_SECONDS) the worker's passes look at the inbox, and at
the outbox only when messages were stored since; a full batch, or a pass that failed, is followed by a
pass that looks at everything at once. The worker here polls every 30 s, so only these rules can make
it send within the test."""
from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from bot.wiring import build
from recovery.clock import ManualClock
from recovery.config import load_settings
from recovery.db import Database
from recovery.models import OutboxMessage
from recovery.outbox import enqueue
from tests.conftest import SECRET


@pytest.fixture
def container(sqlite_url, tmp_path):
    clock = ManualClock(datetime.now(timezone.utc).replace(microsecond=0))
    c = build(load_settings(DATABASE_URL=sqlite_url, SECRET_KEY=SECRET, WORKER_IDLE_SECONDS=30,
                            MAIL_OUTBOX_DIR=str(tmp_path / "mail"), PUBLIC_BASE_URL="http://127.0.0.1:9"),
              clock=clock, db=Database(sqlite_url, busy_seconds=0.3))
    yield c
    c.close()


def staff_messages(c, n: int, *, due_in: float = 0) -> None:
    with c.db.transaction() as s:
        for i in range(n):
            enqueue(s, c.keyring, kind="staff", key=f"staff-{i}-{due_in}", payload={
                "case_id": f"RC-TEST{i:04d}", "event": "approval_requested", "context": {}},
                now=c.clock.now() + timedelta(seconds=due_in))


def pending(c) -> int:
    with c.db.reading() as s:
        return s.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.status == "pending"))


def test_a_full_batch_is_followed_at_once_by_the_rest(container):
    c = container
    staff_messages(c, 60)
    assert c.worker._main_pass() is True  # 50 sent: the batch was full, go again at once
    assert pending(c) == 10
    assert c.worker._main_pass() is False
    assert pending(c) == 0


def test_stored_messages_are_sent_between_looks_and_due_retries_wait_for_the_next_look(container):
    c = container
    assert c.worker._main_pass() is False  # the regular look; the next is 30 s away
    staff_messages(c, 1, due_in=10)        # stored (announced), not due yet
    c.worker._main_pass()
    assert pending(c) == 1
    c.clock.advance(seconds=20)  # due now, but nothing announces it
    c.worker._main_pass()
    assert pending(c) == 1  # waits for the regular look
    staff_messages(c, 1)  # something stored: this pass looks at the outbox, and sends both
    c.worker._main_pass()
    assert pending(c) == 0


def test_a_pass_that_failed_is_followed_by_a_full_look(container, sqlite_url):
    c = container
    staff_messages(c, 1, due_in=10)
    c.worker._main_pass()  # the regular look: not due yet
    c.clock.advance(seconds=20)
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the database: the pass fails
    try:
        with pytest.raises(Exception, match="database is locked"):
            c.worker._main_pass()
    finally:
        other.execute("ROLLBACK")
        other.close()
    c.worker._main_pass()  # the retry looks at everything: the due message goes
    assert pending(c) == 0


def test_a_chat_message_stored_in_this_process_wakes_its_worker(sqlite_url, live):
    """Under `serve` the worker is a thread of the web process: the commit that stores a customer's
    message wakes it (bot/wakeup.py's hook), so a worker that would otherwise look only every 30 s
    answers at once."""
    import time

    from tests.conftest import ChatClient

    server = live(sqlite_url, WORKER_IDLE_SECONDS=30)
    time.sleep(1)  # past its first passes: from now on it sleeps 30 s unless woken
    chat = ChatClient(server.url)
    started = time.monotonic()
    assert "two-factor" in chat.ask("what is 2fa?", timeout=10).lower()
    assert time.monotonic() - started < 5
