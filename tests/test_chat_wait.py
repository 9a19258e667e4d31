"""The web chat's waiting poll (GET .../messages?after=N&wait=S): it answers when the reply is written,
in the same process or (PostgreSQL) another one, waits no longer than asked, holds no database
connection while it waits, and never holds more than its share of the request threads.

Each waiting poll here is given a 30 s re-check, so only the wake-up can answer it within seconds."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import ChatClient


class Request(threading.Thread):
    """One request to a session's messages in a thread of its own: its answer and how long it took."""
    method, expected, what = "GET", 200, "the poll"

    def __init__(self, base: str, session_id: str, **kwargs):
        super().__init__(daemon=True)
        self.url = f"{base}/chat/api/sessions/{session_id}/messages"
        self.kwargs = kwargs
        self.response: requests.Response | None = None
        self.seconds: float | None = None
        self.start()

    def run(self):
        started = time.monotonic()
        self.response = requests.request(self.method, self.url, timeout=30, **self.kwargs)
        self.seconds = time.monotonic() - started

    def messages(self, timeout: float) -> list[dict]:
        self.join(timeout)
        assert not self.is_alive(), f"{self.what} did not answer within {timeout} s"
        assert self.response.status_code == self.expected, self.response.text
        return self.response.json()["messages"]


class Poll(Request):
    """GET ...?after=&wait="""

    def __init__(self, base: str, session_id: str, after: int, wait: int):
        super().__init__(base, session_id, params={"after": after, "wait": wait})


def waiting(waiters, count: int = 1, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while waiters.waiting != count:
        assert time.monotonic() < deadline, f"{waiters.waiting} polls waiting, expected {count}"
        time.sleep(0.01)


def customer_message(chat: ChatClient, text: str) -> None:
    """Say `text` and read its echo, so `chat.after` is past it and only the bot's reply is new."""
    chat.say(text)
    assert [m["sender"] for m in chat.poll()] == ["customer"]


def test_a_waiting_poll_answers_when_the_worker_writes_the_reply(any_db_url, live):
    server = live(any_db_url, worker=False)
    waiters = server.container.chat_waiters
    waiters.recheck = 30
    chat = ChatClient(server.url)
    customer_message(chat, "what is 2fa?")
    poll = Poll(server.url, chat.session_id, chat.after, wait=15)
    waiting(waiters)
    time.sleep(0.3)
    assert poll.is_alive()  # nothing written yet: still waiting
    if server.container.db.is_postgres:
        assert server.container.db.engine.pool.checkedout() == 0  # no connection held while waiting

    written = time.monotonic()
    assert server.container.worker.run_once() > 0
    messages = poll.messages(timeout=5)
    assert [m["sender"] for m in messages] == ["bot"] and "two-factor" in messages[0]["text"].lower()
    assert time.monotonic() - written < 3
    assert waiters.waiting == 0


def test_a_poll_in_the_web_process_wakes_when_a_worker_process_writes_the_reply(any_db_url, live,
                                                                                make_container):
    """The worker here has a database engine of its own, as a worker process would, so its commit calls
    nothing in the web side: only PostgreSQL's NOTIFY (through the web side's listener) or, on SQLite,
    the watcher's look at data_version can tell the waiting poll."""
    web = live(any_db_url, worker=False)
    web.container.chat_waiters.recheck = 30
    worker = make_container(any_db_url)
    chat = ChatClient(web.url)
    customer_message(chat, "what is 2fa?")
    poll = Poll(web.url, chat.session_id, chat.after, wait=15)
    waiting(web.container.chat_waiters)
    time.sleep(0.5)  # the listener, started by this first waiting poll, connects and wakes it once
    assert poll.is_alive()

    written = time.monotonic()
    assert worker.worker.run_once() > 0
    messages = poll.messages(timeout=5)
    assert [m["sender"] for m in messages] == ["bot"]
    assert time.monotonic() - written < 3


def test_a_poll_waits_no_longer_than_asked_and_then_answers_empty(sqlite_url, live):
    server = live(sqlite_url, worker=False)
    chat = ChatClient(server.url)
    poll = Poll(server.url, chat.session_id, chat.after, wait=1)
    assert poll.messages(timeout=5) == []
    assert 0.9 < poll.seconds < 3


def test_a_waiting_poll_on_something_already_there_or_an_unknown_session_answers_at_once(sqlite_url, live):
    server = live(sqlite_url, worker=False)
    chat = ChatClient(server.url)
    there = Poll(server.url, chat.session_id, 0, wait=20)
    assert [m["sender"] for m in there.messages(timeout=5)] == ["bot"]  # the greeting
    assert there.seconds < 1
    unknown = Poll(server.url, "no-such-session", 0, wait=20)
    unknown.join(5)
    assert unknown.response.status_code == 404 and unknown.response.json()["error"] == "unknown_session"
    assert unknown.seconds < 1


@pytest.mark.parametrize("limit, chats", [(1, 2), (64, 3)], ids=["process limit", "per-address limit"])
def test_past_the_limits_a_poll_answers_at_once_and_the_waiting_ones_still_get_their_reply(sqlite_url, live,
                                                                                          limit, chats):
    """With every waiting slot of the process taken, or the two of one address (these clients all come
    from 127.0.0.1), the next poll is a plain poll (answers at once, empty), so waiting polls can never
    take all of a gunicorn process's request threads."""
    server = live(sqlite_url, worker=False)
    waiters = server.container.chat_waiters
    waiters.limit, waiters.recheck = limit, 30
    clients = [ChatClient(server.url) for _ in range(chats)]
    for chat in clients:
        customer_message(chat, "what is 2fa?")
    polls = [Poll(server.url, chat.session_id, chat.after, wait=15) for chat in clients[:-1]]
    waiting(waiters, len(polls))

    last = Poll(server.url, clients[-1].session_id, clients[-1].after, wait=15)
    assert last.messages(timeout=5) == [] and last.seconds < 1
    assert all(poll.is_alive() for poll in polls)

    server.container.worker.drain()
    for poll in polls:
        assert [m["sender"] for m in poll.messages(timeout=5)] == ["bot"]
    waiting(waiters, 0)
    assert [m["sender"] for m in clients[-1].poll()] == ["bot"]  # the plain poll's reply was only later


def test_a_posted_message_with_after_answers_with_what_the_page_has_not_seen(any_db_url, live):
    """With "after", the POST's answer is the transcript past it: a bot reply the page had not polled
    for yet, then this message's own line as stored (redacted), so the page never skips a line."""
    server = live(any_db_url, worker=False)
    chat = ChatClient(server.url)
    greeting = chat.after
    first = requests.post(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                          json={"text": "what is 2fa?", "after": greeting}, timeout=10).json()
    assert [(m["sender"], m["text"]) for m in first["messages"]] == [("customer", "what is 2fa?")]
    assert first["duplicate"] is False
    server.container.worker.drain()  # the reply is written; this page has not polled for it

    second = requests.post(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                           json={"text": "my password is hunter2xyz", "after": first["messages"][0]["seq"],
                                 "client_id": "c-2"}, timeout=10).json()
    assert [m["sender"] for m in second["messages"]] == ["bot", "customer"]
    assert "two-factor" in second["messages"][0]["text"].lower()
    assert "hunter2xyz" not in second["messages"][1]["text"] and "[password hidden]" in second["messages"][1]["text"]
    seqs = [m["seq"] for m in first["messages"] + second["messages"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3

    # what a plain poll reads is the same lines; a retried POST is a duplicate and repeats them
    assert [m["seq"] for m in requests.get(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                                           params={"after": greeting}, timeout=10).json()["messages"]] == seqs
    again = requests.post(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                          json={"text": "my password is hunter2xyz", "after": first["messages"][0]["seq"],
                                "client_id": "c-2"}, timeout=10).json()
    assert again["duplicate"] is True and again["messages"] == second["messages"]
    # without "after", the answer is as before: no transcript
    plain = requests.post(f"{server.url}/chat/api/sessions/{chat.session_id}/messages",
                          json={"text": "thanks"}, timeout=10).json()
    assert plain == {"accepted": True, "duplicate": False}


def test_a_commit_is_announced_once_when_it_commits_not_when_a_savepoint_is_released(any_db_url, make_container):
    """SQLAlchemy calls its commit hook for a savepoint's release too; only the real commit may wake
    anyone, with everything the transaction wrote, and on PostgreSQL both NOTIFYs go out at commit."""
    import psycopg

    from bot import wakeup
    from recovery.db import Database
    from recovery.models import ChatMessage, ChatSession
    from recovery.outbox import enqueue

    c = make_container(any_db_url)  # migrated schema
    db = Database(any_db_url)
    calls = []
    wakeup.install(db, lambda stored, chats: calls.append((set(stored), set(chats), committed[0])))
    committed = [False]
    listener = None
    if db.is_postgres:
        listener = psycopg.connect(db.engine.url.set(drivername="postgresql").render_as_string(False),
                                   autocommit=True)
        listener.execute(f"LISTEN {wakeup.CHANNEL}")
        listener.execute(f"LISTEN {wakeup.CHAT_CHANNEL}")
    try:
        with db.transaction() as s:
            s.add(ChatSession(id="S-savepoint", locale="en", created_at=c.clock.now()))
            s.add(ChatMessage(session_id="S-savepoint", sender="bot", text="hello", buttons=[],
                              created_at=c.clock.now()))
            enqueue(s, c.keyring, kind="intercom", key="k-savepoint", payload={"conversation": "ic:1"},
                    now=c.clock.now())
            with s.begin_nested():
                pass
            assert calls == []  # released, not committed
            with pytest.raises(ZeroDivisionError):
                with s.begin_nested():
                    1 / 0
            assert calls == []
            committed[0] = True
        assert calls == [({wakeup.OUTBOX}, {"S-savepoint"}, True)]
        if listener is not None:
            notes = {(n.channel, n.payload) for n in listener.notifies(timeout=2, stop_after=2)}
            me = wakeup.origin(db.engine)  # the sender, so its own listener can leave them out
            assert notes == {(wakeup.CHANNEL, f"{wakeup.OUTBOX} {me}"), (wakeup.CHAT_CHANNEL, f"S-savepoint {me}")}
    finally:
        if listener is not None:
            listener.close()
        db.dispose()


class Post(Request):
    """POST .../messages with "after" and "wait"."""
    method, expected, what = "POST", 202, "the POST"

    def __init__(self, base: str, session_id: str, text: str, after: int, wait: int, client_id: str | None = None):
        self.body = {"text": text, "after": after, "wait": wait} | ({"client_id": client_id} if client_id else {})
        super().__init__(base, session_id, json=self.body)


def test_a_posted_message_with_wait_answers_with_its_line_and_the_reply_once_written(any_db_url, live):
    """With "wait", the POST's answer waits for the reply: its own line as stored (redacted), then the
    bot's, as soon as the worker writes it and not before; its own commit does not end the wait."""
    server = live(any_db_url, worker=False)
    waiters = server.container.chat_waiters
    waiters.recheck = 30
    chat = ChatClient(server.url)
    post = Post(server.url, chat.session_id, "what is 2fa? my password is hunter2xyz", chat.after, wait=15)
    waiting(waiters)
    time.sleep(0.5)
    assert post.is_alive()  # stored, and waiting for the reply
    if server.container.db.is_postgres:
        assert server.container.db.engine.pool.checkedout() == 0  # no connection held while waiting

    written = time.monotonic()
    assert server.container.worker.run_once() > 0
    messages = post.messages(timeout=5)
    assert time.monotonic() - written < 3
    assert [m["sender"] for m in messages] == ["customer", "bot"]
    assert "hunter2xyz" not in messages[0]["text"] and "[password hidden]" in messages[0]["text"]
    assert "hidden your last message" in messages[1]["text"]  # the password warning comes first
    assert post.response.json()["duplicate"] is False
    assert waiters.waiting == 0
    # what the page now has is the whole transcript: a poll past the reply finds nothing
    chat.after = messages[-1]["seq"]
    assert chat.poll() == []


def test_a_posted_message_waits_no_longer_than_asked_or_not_at_all_for_a_retry_or_with_no_room(sqlite_url, live):
    """No reply within `wait`: the answer comes then, with the message's own line, and with a bot line
    the page had not seen before it (that one answered an earlier message: it does not end the wait). A
    retried POST whose reply is already written answers at once. No waiting slot left: at once, with
    the own line."""
    server = live(sqlite_url, worker=False)
    waiters = server.container.chat_waiters
    chat = ChatClient(server.url)
    slow = Post(server.url, chat.session_id, "what is 2fa?", chat.after, wait=1)
    assert [m["sender"] for m in slow.messages(timeout=5)] == ["customer"]
    assert 0.9 < slow.seconds < 3

    server.container.worker.drain()  # the reply to it, which this page has not seen
    seen = slow.response.json()["messages"][-1]["seq"]
    news = Post(server.url, chat.session_id, "thanks", seen, wait=1, client_id="c-news")
    assert [m["sender"] for m in news.messages(timeout=5)] == ["bot", "customer"]
    assert 0.9 < news.seconds < 3
    server.container.worker.drain()
    retried = requests.post(news.url, json=news.body | {"wait": 15}, timeout=10)
    assert retried.json()["duplicate"] is True
    assert [m["sender"] for m in retried.json()["messages"]] == ["bot", "customer", "bot"]
    assert retried.elapsed.total_seconds() < 1

    waiters.limit = 0
    full = Post(server.url, chat.session_id, "what is a recovery code?",
                retried.json()["messages"][-1]["seq"], wait=15)
    assert [m["sender"] for m in full.messages(timeout=5)] == ["customer"]
    assert full.seconds < 1 and waiters.waiting == 0


def test_a_waiting_poll_of_another_tab_wakes_when_the_customer_posts(any_db_url, live):
    """The customer's line is written with a plain INSERT (no ORM flush): its commit still wakes the
    session's waiting polls, say the same chat open in a second tab: in this process through the commit
    hook (the SQLite file watcher is off, as under `serve`), and on PostgreSQL through NOTIFY as well."""
    server = live(any_db_url, worker=False)
    server.container.chat_waiters.recheck = 30
    server.container.chat_waiters.watch_file = False
    chat = ChatClient(server.url)
    other_tab = Poll(server.url, chat.session_id, chat.after, wait=15)
    waiting(server.container.chat_waiters)
    said = time.monotonic()
    chat.say("what is 2fa?")
    assert [m["sender"] for m in other_tab.messages(timeout=5)] == ["customer"]
    assert time.monotonic() - said < 2


def test_a_commit_wakes_the_watches_of_other_threads_but_not_its_own(sqlite_url, make_container):
    """A POST that waits starts watching inside the transaction that stores its message: that commit is
    no news to it, while a poll waiting in another thread must hear of it."""
    c = make_container(sqlite_url)
    waiters = c.chat_waiters
    theirs, registered, release = [], threading.Event(), threading.Event()

    def other_thread():
        with waiters.watching("S-1", 0, "10.0.0.2") as watch:
            theirs.append(watch)
            registered.set()
            release.wait(5)

    other = threading.Thread(target=other_thread, daemon=True)
    other.start()
    assert registered.wait(5)
    with waiters.watching("S-1", 0, "10.0.0.1") as mine:
        waiters.written(["S-1"])
        assert not mine.is_set()
        assert theirs[0].is_set()
    release.set()
    other.join(5)


def test_a_posted_message_reads_the_transcript_twice_once_under_lock_once_for_the_reply(any_db_url, live):
    """The waiting POST reads the transcript under the session's lock and once more when the reply is
    written: its own commit does not wake it, neither through the commit hook (the rule that a commit
    does not wake its own thread's watches; SQLite here as under `recoverybot serve`, with no file
    watcher) nor, on PostgreSQL, through its own NOTIFY, which carries its sender so this process's
    listener leaves it out. Without either rule it read three times."""
    from sqlalchemy import event

    server = live(any_db_url, worker=False)
    waiters = server.container.chat_waiters
    waiters.recheck, waiters.watch_file = 30, False
    chat = ChatClient(server.url)
    # the first waiting request starts the PostgreSQL listener, which wakes every waiter once it is in
    Poll(server.url, chat.session_id, chat.after, wait=1).messages(timeout=5)
    time.sleep(1)  # it connects in milliseconds; this leaves it ample time
    reads = []
    event.listen(server.container.db.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *a: reads.append(statement)
                 if "LEFT OUTER JOIN chat_messages" in statement else None)
    post = Post(server.url, chat.session_id, "what is 2fa?", chat.after, wait=15)
    waiting(waiters)
    time.sleep(0.3)
    assert server.container.worker.run_once() > 0
    assert [m["sender"] for m in post.messages(timeout=5)] == ["customer", "bot"]
    assert len(reads) == 2


def test_every_container_on_one_database_hears_its_commits(sqlite_url, make_container):
    """An engine's own listeners leave out the NOTIFYs it sends, so a second container built on the same
    Database must be told by the commit hook too: each install adds its callback."""
    from bot import wakeup
    from recovery.db import Database
    from recovery.models import ChatMessage, ChatSession

    c = make_container(sqlite_url)  # migrated schema
    db = Database(sqlite_url)
    first, second = [], []
    wakeup.install(db, lambda stored, chats: first.append(set(chats)))
    wakeup.install(db, lambda stored, chats: second.append(set(chats)))
    try:
        with db.transaction() as s:
            s.add(ChatSession(id="S-two", locale="en", created_at=c.clock.now()))
            s.add(ChatMessage(session_id="S-two", sender="bot", text="hi", buttons=[], created_at=c.clock.now()))
        assert first == second == [{"S-two"}]
    finally:
        db.dispose()
