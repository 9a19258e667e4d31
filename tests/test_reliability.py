"""Reliability (docs/architecture.md, "The flow of a message"): crashes, redeliveries, retries and concurrent workers lose nothing
and duplicate nothing that we can prevent."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select

from bot.cli import main as cli
from bot.worker import Worker
from recovery import db as dbmod
from recovery import inbox, outbox
from recovery.clock import ManualClock
from recovery.models import ChatMessage, InboxEvent, OutboxMessage
from recovery.outbox import Dispatcher
from tests.conftest import SECRET, ChatClient, Mailbox, free_port, scratch_pg_database

RECOVERYBOT = str(Path(sys.executable).parent / "recoverybot")
MAIL_DOMAIN = "localhost"  # from the default MAIL_FROM, "<BRAND_NAME> <no-reply@localhost>"


# ---- helpers ---------------------------------------------------------------------------------------

def message_id(key: str) -> str:
    """The Message-ID header bot/mail.py derives from an outbox idempotency key."""
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@{MAIL_DOMAIN}>"


def queue_emails(c, keys: list[str]) -> None:
    """Queue one verification-code email per key, in one transaction, as a state change would."""
    with c.db.transaction() as s:
        for i, key in enumerate(keys):
            outbox.enqueue(s, c.keyring, kind="email", key=key, now=c.clock.now(),
                           payload={"template": "verification_code", "to": f"user{i}@example.com",
                                    "locale": "en", "context": {"code": f"{100000 + i}", "minutes": 10,
                                                                "case_id": f"RC-REL{i:05d}",
                                                                "cancel_url": "http://127.0.0.1:9/cancel/x"}})


def outbox_rows(c) -> list[OutboxMessage]:
    with c.db.transaction() as s:
        return list(s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def received_ids(box: Mailbox) -> list[str]:
    with box.lock:
        return [m["Message-ID"] for m in box.messages]


class SlowMailbox(Mailbox):
    """A real SMTP receiver that takes its time to answer after storing each message."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):
        answer = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return answer


class FlakyMailbox(Mailbox):
    """A real SMTP receiver that answers 451 (try again later) to the first `failures` messages."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures, self.refused = failures, 0

    async def handle_DATA(self, server, session, envelope):
        if self.refused < self.failures:
            self.refused += 1
            return "451 4.3.0 mailbox busy, try again later"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def smtp_server():
    """smtp_server(handler) -> SMTP_URL of a real aiosmtpd server using that handler."""
    from aiosmtpd.controller import Controller

    controllers = []

    def start(handler) -> str:
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        controller.start()
        controllers.append(controller)
        return f"smtp://127.0.0.1:{port}"

    yield start
    for controller in controllers:
        controller.stop()


class RecordingSender:
    """The network edge of a test: records what it was asked to send, and by whom."""

    def __init__(self, name: str, log: list, lock: threading.Lock, delay: float = 0.0):
        self.name, self.log, self.lock, self.delay = name, log, lock, delay

    def send(self, message: outbox.Outgoing) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.log.append((message.idempotency_key, self.name))


def run_together(*targets) -> None:
    """Start the callables at the same moment in threads; re-raise the first failure."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            barrier.wait()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


# ---- 1. a worker killed mid-dispatch ---------------------------------------------------------------

def test_worker_killed_mid_dispatch_loses_no_email(any_db_url, make_container, smtp_server, tmp_path):
    """A `recoverybot worker` killed with SIGKILL mid-send loses no email: a second worker sends the rest."""
    box = SlowMailbox(delay=0.3)
    smtp_url = smtp_server(box)
    c = make_container(any_db_url, SMTP_URL=smtp_url)
    keys = [f"reliability:kill:{i}" for i in range(30)]
    queue_emails(c, keys)

    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": any_db_url, "SECRET_KEY": SECRET,
           "SMTP_URL": smtp_url, "LOG_LEVEL": "INFO", "WORKER_METRICS_PORT": "0"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([RECOVERYBOT, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while len(received_ids(box)) < 3:
            assert proc.poll() is None, f"worker exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"worker sent nothing:\n{log_path.read_text()}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    before = outbox_rows(c)
    stranded = [r for r in before if r.status == "pending"]
    assert stranded, "the kill should land while messages are still leased to the dead worker"
    assert all(r.lease_until is not None for r in stranded)
    assert len(received_ids(box)) < len(keys)

    # The dead worker's leases run out (LEASE); a second worker on a clock past that picks them up.
    box.delay = 0
    clock = ManualClock()
    clock.advance(seconds=outbox.LEASE.total_seconds() + 1)
    second = make_container(any_db_url, SMTP_URL=smtp_url, clock=clock)
    second.worker.drain()

    got = received_ids(box)
    assert {message_id(k) for k in keys} <= set(got), "an email was lost"
    assert [r.status for r in outbox_rows(c)] == ["sent"] * len(keys)
    # At least once, never many: at most the message in flight at the kill is sent twice.
    assert len(got) - len(set(got)) <= 1


# ---- 2. duplicate inbound events -------------------------------------------------------------------

def test_duplicate_chat_message_is_processed_once(any_db_url, live):
    """The same chat message posted twice (same client_id) is stored once, shown once, answered once."""
    server = live(any_db_url, worker=False)
    c = server.container
    chat = ChatClient(server.url)
    url = f"{server.url}/chat/api/sessions/{chat.session_id}/messages"
    body = {"text": "What is 2FA?", "client_id": "msg-0001"}

    first = requests.post(url, json=body, timeout=10)
    again = requests.post(url, json=body, timeout=10)
    assert (first.status_code, first.json()["duplicate"]) == (202, False)
    assert (again.status_code, again.json()["duplicate"]) == (202, True)
    # A burst of redeliveries racing each other is stored once too.
    racing = []
    run_together(*[lambda: racing.append(requests.post(url, json=body, timeout=10).json()["duplicate"])
                   for _ in range(6)])
    assert racing == [True] * 6
    c.worker.drain()
    c.worker.drain()

    conversation = f"webchat:{chat.session_id}"
    with c.db.transaction() as s:
        events = s.scalars(select(InboxEvent).where(InboxEvent.conversation_key == conversation)).all()
        lines = s.scalars(select(ChatMessage).where(ChatMessage.session_id == chat.session_id)
                          .order_by(ChatMessage.seq)).all()
    assert len(events) == 1 and events[0].processed_at is not None
    customer = [m for m in lines if m.sender == "customer"]
    replies = [m for m in lines[1:] if m.sender == "bot"]  # lines[0] is the greeting
    assert [m.text for m in customer] == ["What is 2FA?"]
    assert len(replies) == 1 and "Two-factor authentication" in replies[0].text


# ---- 3. retries, backoff, dead letters -------------------------------------------------------------

def test_email_retries_with_exponential_backoff_then_delivers_once(any_db_url, make_container, smtp_server):
    """An SMTP server answering 451 three times: attempts count up, the wait doubles, then one delivery."""
    box = FlakyMailbox(failures=3)
    clock = ManualClock()
    c = make_container(any_db_url, SMTP_URL=smtp_server(box), clock=clock)
    queue_emails(c, ["reliability:retry:0"])

    delays = []
    for attempt in (1, 2, 3):
        assert c.dispatcher.run_once() == 1
        (row,) = outbox_rows(c)
        assert (row.status, row.attempts) == ("pending", attempt)
        assert "451" in row.last_error and row.lease_until is None
        delays.append((row.next_attempt_at - clock.now()).total_seconds())
        assert c.dispatcher.run_once() == 0, "retried before its backoff ran out"
        clock.advance(seconds=delays[-1] - 0.5)
        assert c.dispatcher.run_once() == 0, "retried before its backoff ran out"
        clock.advance(seconds=0.500001)
    # base 2 s doubling, with +-20 % jitter
    for attempt, delay in enumerate(delays, start=1):
        expected = outbox.BACKOFF_BASE * 2 ** (attempt - 1)
        assert 0.8 * expected <= delay <= 1.2 * expected, (attempt, delays)
    assert delays[0] < delays[1] < delays[2]
    assert box.messages == []

    assert c.dispatcher.run_once() == 1
    (row,) = outbox_rows(c)
    assert (row.status, row.attempts, row.last_error) == ("sent", 4, None)
    assert row.sent_at == clock.now()
    assert received_ids(box) == [message_id("reliability:retry:0")]
    assert c.dispatcher.run_once() == 0


def test_undeliverable_email_goes_dead_and_cli_requeues_it(any_db_url, make_container, smtp, tmp_path):
    """After max attempts against a closed port the email is dead with its error; the CLI lists and retries it."""
    clock = ManualClock()
    closed = f"smtp://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    c = make_container(any_db_url, SMTP_URL=closed, clock=clock)
    queue_emails(c, ["reliability:dead:0"])

    for attempt in range(1, outbox.MAX_ATTEMPTS + 1):
        assert c.dispatcher.run_once() == 1
        (row,) = outbox_rows(c)
        assert row.attempts == attempt
        if attempt < outbox.MAX_ATTEMPTS:
            assert row.status == "pending"
            clock.advance(seconds=(row.next_attempt_at - clock.now()).total_seconds())
    assert row.status == "dead" and "Connection refused" in row.last_error
    clock.advance(hours=1)
    assert c.dispatcher.run_once() == 0, "a dead message is not retried on its own"

    runner = CliRunner()
    env = {"DATABASE_URL": any_db_url, "SECRET_KEY": SECRET, "SMTP_URL": closed}
    listed = runner.invoke(cli, ["outbox", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert f"{row.id}  email  reliability:dead:0  attempts={outbox.MAX_ATTEMPTS}" in listed.output
    assert "Connection refused" in listed.output

    missing = runner.invoke(cli, ["outbox", "retry", str(row.id + 999)], env=env)
    assert missing.exit_code != 0 and "no dead message" in missing.output
    retried = runner.invoke(cli, ["outbox", "retry", str(row.id)], env=env)
    assert retried.exit_code == 0 and "1 message(s) queued again" in retried.output, retried.output
    (row,) = outbox_rows(c)
    assert (row.status, row.attempts) == ("pending", 0)
    assert "no dead messages" in runner.invoke(cli, ["outbox", "list"], env=env).output

    # The mail server is back: a worker on the real SMTP server delivers the re-queued message.
    smtp_url, box = smtp
    fixed = make_container(any_db_url, SMTP_URL=smtp_url, clock=clock)
    fixed.worker.drain()
    assert received_ids(box) == [message_id("reliability:dead:0")]
    assert [r.status for r in outbox_rows(c)] == ["sent"]


def test_refused_recipient_is_dead_at_once(any_db_url, make_container, smtp_server):
    """A permanent 5xx answer parks the message as dead after one attempt instead of retrying it."""

    class Refusing(Mailbox):
        async def handle_DATA(self, server, session, envelope):
            return "554 5.7.1 message refused"

    c = make_container(any_db_url, SMTP_URL=smtp_server(Refusing()), clock=ManualClock())
    queue_emails(c, ["reliability:refused:0"])
    assert c.dispatcher.run_once() == 1
    (row,) = outbox_rows(c)
    assert (row.status, row.attempts) == ("dead", 1)
    assert "554" in row.last_error


# ---- 4. concurrent dispatchers ---------------------------------------------------------------------

def test_two_dispatchers_never_send_the_same_message(any_db_url, make_container):
    """Two workers dispatching one outbox of 200 messages concurrently send each exactly once."""
    first = make_container(any_db_url)
    second = make_container(any_db_url)
    sent, lock = [], threading.Lock()
    dispatchers = [Dispatcher(c.db, keyring=c.keyring, clock=c.clock,
                              senders={"email": RecordingSender(name, sent, lock, delay=0.001)})
                   for name, c in (("first", first), ("second", second))]
    keys = [f"reliability:pair:{i}" for i in range(200)]
    queue_emails(first, keys)

    def dispatch(dispatcher):
        def loop():
            while dispatcher.run_once(limit=5):
                pass
        return loop

    run_together(*[dispatch(d) for d in dispatchers])

    assert sorted(k for k, _ in sent) == sorted(keys), "a message was sent twice or not at all"
    by_worker = {name: sum(1 for _, n in sent if n == name) for name in ("first", "second")}
    assert all(by_worker.values()), f"both dispatchers should have taken work: {by_worker}"
    rows = outbox_rows(first)
    assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}


def test_a_batch_slower_than_its_lease_is_not_sent_twice(any_db_url, make_container):
    """While one dispatcher works slowly through a batch, another never resends the batch's later messages."""
    clock = ManualClock()
    first = make_container(any_db_url, clock=clock)
    second = make_container(any_db_url, clock=clock)
    sent, lock = [], threading.Lock()

    class SlowLink(RecordingSender):
        """Each send takes 0.4 leases of (manual) time, as a struggling mail server would, so the batch
        takes four leases; midway through the batch the other worker makes a pass."""

        def send(self, message):
            clock.advance(seconds=outbox.LEASE.total_seconds() * 0.4)
            super().send(message)
            if len(sent) == 5:
                other.run_once()

    slow = Dispatcher(first.db, keyring=first.keyring, clock=clock, senders={"email": SlowLink("slow", sent, lock)})
    other = Dispatcher(second.db, keyring=second.keyring, clock=clock,
                       senders={"email": RecordingSender("other", sent, lock)})
    keys = [f"reliability:slow:{i}" for i in range(10)]
    queue_emails(first, keys)

    slow.run_once()
    clock.advance(seconds=outbox.LEASE.total_seconds() + 1)
    while other.run_once():
        pass

    sent_keys = [k for k, _ in sent]
    assert sorted(sent_keys) == sorted(keys), f"duplicates or losses: {sent}"
    assert {r.status for r in outbox_rows(first)} == {"sent"}


# ---- 5. inbox order per conversation ---------------------------------------------------------------

@pytest.mark.parametrize("with_prepare", [False, True], ids=["plain", "prepare-step"])
def test_inbox_events_are_processed_in_order_per_conversation_by_two_workers(any_db_url, make_container,
                                                                             with_prepare):
    """Two workers share one inbox of 10 conversations x 12 events; each conversation is handled in order,
    once; also with a handler that has a `prepare` step (as when Intercom is configured), whose peek
    happens outside the claiming transaction."""
    first, second = make_container(any_db_url), make_container(any_db_url)
    handled, lock = [], threading.Lock()

    def recording_handler(name):
        def handle(session, event, *prepared):
            time.sleep(random.uniform(0, 0.003))  # widen the window in which a race could show
            if with_prepare:
                assert prepared == (("prepared", event.payload["n"]),)
            with lock:
                handled.append((event.conversation_key, event.payload["n"], name))
        if with_prepare:
            handle.prepare = lambda source, payload: ("prepared", payload["n"])
        return handle

    now = first.clock.now()
    conversations = [f"test:{uuid.uuid4().hex[:8]}" for _ in range(10)]
    for burst in range(3):  # runs of four events of one conversation, as a chatty customer sends them
        for conv in conversations:
            for n in range(burst * 4, burst * 4 + 4):
                assert inbox.store(first.db, source="test", delivery_key=f"{conv}:{n}", conversation_key=conv,
                                   payload={"n": n}, now=now)
    workers = [Worker(db=c.db, recovery=c.recovery, dispatcher=c.dispatcher, handler=recording_handler(name),
                      clock=c.clock) for name, c in (("first", first), ("second", second))]

    run_together(*[w.drain for w in workers])

    per_conversation = defaultdict(list)
    for conv, n, _ in handled:
        per_conversation[conv].append(n)
    assert dict(per_conversation) == {conv: list(range(12)) for conv in conversations}
    if first.db.is_postgres:
        # SQLite runs one writer at a time, so there one worker may legitimately take every event.
        assert {name for *_, name in handled} == {"first", "second"}, "both workers should have taken events"
    with first.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(InboxEvent)
                        .where(InboxEvent.processed_at.is_(None))) == 0


def test_prepare_step_peek_passes_over_an_event_another_worker_holds(pg_url, make_container):
    """While one worker holds a conversation's event, another worker with a prepare-step handler takes
    the next conversation's event, not the held one (it used to peek the held event, fail to claim it and
    peek it again, spinning until the holder committed) and not the held event's successor."""
    c = make_container(pg_url)
    now = c.clock.now()
    for key, conversation in [("a1", "a"), ("a2", "a"), ("b1", "b")]:
        assert inbox.store(c.db, source="test", delivery_key=key, conversation_key=conversation,
                           payload={"key": key}, now=now)
    handled: list[str] = []

    def handler(session, event, prepared):
        assert prepared == event.payload["key"]
        handled.append(prepared)

    handler.prepare = lambda source, payload: payload["key"]
    holder = create_engine(pg_url)
    try:
        with holder.begin() as conn:  # the other worker, mid-way through a1
            conn.execute(select(InboxEvent.id).where(InboxEvent.delivery_key == "a1").with_for_update())
            assert inbox.process_one(c.db, handler, c.clock.now)
            assert handled == ["b1"]
            assert not inbox.process_one(c.db, handler, c.clock.now)  # a1 is held and a2 waits behind it
        assert handled == ["b1"]
        while inbox.process_one(c.db, handler, c.clock.now):
            pass
        assert handled == ["b1", "a1", "a2"]
    finally:
        holder.dispose()


def test_chat_dialogs_stay_in_order_with_two_workers(any_db_url, live, make_container):
    """Messages sent in quick succession in several chats get their answers in order with two workers."""
    server = live(any_db_url, worker=False)
    web, other = server.container, make_container(any_db_url)
    chats = [ChatClient(server.url) for _ in range(5)]
    for i, chat in enumerate(chats):
        for text_ in ("I lost my authenticator", f"nobody{i}@example.com", "status"):
            chat.say(text_)

    run_together(web.worker.drain, other.worker.drain)

    with web.db.transaction() as s:
        turns = {e.id: e.conversation_key for e in s.scalars(select(InboxEvent))}
        for chat in chats:
            replies = s.scalars(select(ChatMessage).where(
                ChatMessage.session_id == chat.session_id,
                ChatMessage.source_key.startswith(f"webchat:{chat.session_id}:"))).all()
            # key: webchat:<session>:<inbox event id>:<n>; order by the turn it answers
            by_turn = sorted(replies, key=lambda m: tuple(int(p) for p in m.source_key.rsplit(":", 2)[1:]))
            assert all(turns[int(m.source_key.rsplit(":", 2)[1])] == f"webchat:{chat.session_id}"
                       for m in by_turn)
            texts = [m.text for m in by_turn]
            assert len(texts) == 3, texts
            assert "email address registered" in texts[0]
            assert "6-digit verification code" in texts[1]
            assert "waiting for the 6-digit code" in texts[2]


# ---- 6. migrations ---------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request, tmp_path):
    """A database with no schema at all, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with scratch_pg_database("rb_fresh") as url:
        yield url


def test_db_upgrade_is_idempotent(empty_db_url):
    """`recoverybot db upgrade` run twice (as every release phase does) succeeds and leaves the revision alone."""
    runner = CliRunner()
    env = {"DATABASE_URL": empty_db_url, "SECRET_KEY": SECRET}
    assert dbmod.current_revision(empty_db_url) is None

    first = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert first.exit_code == 0, first.output
    revision = dbmod.current_revision(empty_db_url)
    assert revision and f"schema is at revision {revision}" in first.output

    second = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert second.exit_code == 0, second.output
    assert second.output == first.output
    assert dbmod.current_revision(empty_db_url) == revision


def test_an_event_that_keeps_losing_its_database_connection_is_parked_not_retried_forever(make_container, pg_url):
    """Losing the connection while an event is handled uses up no attempt: a database restart says nothing
    about the event. An event whose handling loses it every time (here it ends its own server process)
    counts an attempt every third time instead, so it is parked after its five like any failing event, and
    the queue moves on to the next."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from recovery import inbox
    from recovery.models import InboxEvent

    c = make_container(pg_url)
    with c.db.transaction() as s:
        for key, conversation in (("k-crash", "conv-a"), ("k-fine", "conv-b")):
            inbox.add(s, source="test", delivery_key=key, conversation_key=conversation, payload={},
                      now=c.clock.now())
    handled = []

    def handler(session, event):
        if event.delivery_key == "k-crash":
            session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        handled.append(event.delivery_key)

    lost, calls = 0, 0
    while calls < 40:
        calls += 1
        try:
            if not inbox.process_one(c.db, handler, c.clock.now):
                break
        except OperationalError:
            lost += 1
    assert handled == ["k-fine"] and lost == inbox.MAX_ATTEMPTS * inbox.CUT_OFF_LIMIT, (handled, lost, calls)
    with c.db.transaction() as s:
        crash = s.scalar(select(InboxEvent).where(InboxEvent.delivery_key == "k-crash"))
        assert crash.processed_at is None and crash.attempts == inbox.MAX_ATTEMPTS
        assert "lost the database connection 3 times in a row" in crash.last_error


def test_one_lost_connection_uses_up_no_attempt(make_container, pg_url):
    """The other side of the limit above: an event cut off once (a restart) is handled on the next try, with
    all its attempts left and nothing recorded against it."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from recovery import inbox
    from recovery.models import InboxEvent

    c = make_container(pg_url)
    with c.db.transaction() as s:
        inbox.add(s, source="test", delivery_key="k-once", conversation_key="conv-a", payload={}, now=c.clock.now())
    tries = []

    def handler(session, event):
        tries.append(event.id)
        if len(tries) == 1:
            session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    with pytest.raises(OperationalError):
        inbox.process_one(c.db, handler, c.clock.now)
    assert inbox.process_one(c.db, handler, c.clock.now)
    with c.db.transaction() as s:
        event = s.scalar(select(InboxEvent).where(InboxEvent.delivery_key == "k-once"))
        assert event.processed_at is not None and event.attempts == 0 and event.last_error is None


def test_an_event_given_up_between_its_peek_and_its_claim_is_not_handled(make_container, sqlite_url):
    """With a `prepare` step the event is peeked, prepared with no transaction open, then claimed by id. If
    another worker gives the event up in between (its last attempt failed), the claim must leave it alone:
    whoever sent it has been told that nothing came of it."""
    from sqlalchemy import update

    from recovery import inbox
    from recovery.models import InboxEvent

    c = make_container(sqlite_url)
    with c.db.transaction() as s:
        inbox.add(s, source="test", delivery_key="k-raced", conversation_key="conv-a", payload={}, now=c.clock.now())
    handled = []

    def handler(session, event, prepared=None):
        handled.append(event.delivery_key)

    def prepare(source, payload):  # meanwhile, another worker's last attempt fails and gives the event up
        with c.db.transaction() as s:
            s.execute(update(InboxEvent).values(attempts=inbox.MAX_ATTEMPTS, last_error="failed elsewhere"))

    handler.prepare = prepare
    inbox.process_one(c.db, handler, c.clock.now)
    assert handled == []
    with c.db.transaction() as s:
        event = s.scalar(select(InboxEvent))
        assert event.processed_at is None and event.attempts == inbox.MAX_ATTEMPTS


def test_a_short_account_service_outage_delays_a_reply_and_loses_nothing(sqlite_url, live):
    """The account API down for 2 s while a customer gives their address: the customer is told at once,
    and once, that the message is waiting; it is tried again after OUTAGE_RETRY_SECONDS[0] rather than
    used up in a second, and the customer gets the usual reply."""
    from tests.account_backend import AccountBackend, record

    backend = AccountBackend()
    backend.add(record("acct-1001", "alex@example.com"))
    server = live(sqlite_url, **backend.settings())
    try:
        chat = ChatClient(server.url)
        assert "email address" in chat.ask("I lost my authenticator")
        backend.failing.add("accounts/lookup")
        back = threading.Timer(2.0, backend.failing.clear)
        back.start()
        started = time.monotonic()
        assert chat.ask("alex@example.com", timeout=5).startswith("One moment: a service I need isn't answering")
        told = time.monotonic() - started
        assert "emailed it a 6-digit verification code" in chat.reply(timeout=20)
        waited = time.monotonic() - started
        with server.container.db.reading() as s:
            attempts = {e.delivery_key: (e.attempts, e.processed_at is not None) for e in s.scalars(select(InboxEvent))}
    finally:
        back.cancel()
        backend.close()
    assert told < 3, told  # told at the first failure that the message waits, not after the wait
    assert inbox.OUTAGE_RETRY_SECONDS[0] <= waited < inbox.OUTAGE_RETRY_SECONDS[0] + 5, waited
    assert sorted(attempts.values()) == [(0, True), (1, True)], attempts
    assert len([m for m in chat.seen if m["text"].startswith("One moment")]) == 1


def test_a_message_given_up_on_tells_the_customer_and_the_next_one_is_answered(sqlite_url, make_container):
    """The account API down for good: the customer's message is tried MAX_ATTEMPTS times over about five
    minutes, then the customer is told once that it could not be acted on (never left waiting in
    silence), and their next message, once the service is back, is answered as usual."""
    from bot.web import create_app
    from tests.account_backend import AccountBackend, record

    backend = AccountBackend()
    backend.add(record("acct-1001", "alex@example.com"))
    clock = ManualClock()
    try:
        c = make_container(sqlite_url, clock=clock, **backend.settings())
        client = create_app(c).test_client()
        sid = client.post("/chat/api/sessions", json={"locale": "en"}).get_json()["session_id"]

        def say(text: str) -> None:
            assert client.post(f"/chat/api/sessions/{sid}/messages", json={"text": text}).status_code == 202
            c.worker.drain()

        def bot_lines() -> list[str]:
            return [m["text"] for m in client.get(f"/chat/api/sessions/{sid}/messages").get_json()["messages"]
                    if m["sender"] == "bot"]

        say("I lost my authenticator")
        before = bot_lines()
        backend.failing.add("accounts/lookup")
        say("alex@example.com")
        waiting = ["One moment: a service I need isn't answering right now, so your message is waiting. "
                   "I'll reply as soon as it's back; there's no need to send it again."]
        for wait in inbox.OUTAGE_RETRY_SECONDS:
            assert bot_lines() == before + waiting  # told once that it waits, then nothing until it ends
            clock.advance(seconds=wait)
            c.worker.drain()
        told = bot_lines()[len(before):]
        assert told == waiting + ["Sorry, something went wrong on our side and I couldn't act on your last "
                                  "message. Please try again in a few minutes."], told
        with c.db.reading() as s:
            given_up = s.scalars(select(InboxEvent).where(InboxEvent.attempts >= inbox.MAX_ATTEMPTS)).all()
            assert len(given_up) == 1 and "503" in given_up[0].last_error
        clock.advance(seconds=3600)
        c.worker.drain()
        assert bot_lines()[len(before):] == told  # said once
        backend.failing.clear()
        say("alex@example.com")
        assert len(bot_lines()) == len(before) + 3 and "6" in bot_lines()[-1]
    finally:
        backend.close()
