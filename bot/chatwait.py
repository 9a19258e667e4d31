"""Waiting requests for the web chat: GET .../messages?after=N&wait=S answers as soon as a message after
N is written (or after S seconds, with nothing), and so does a message's POST with "after" and "wait"
(bot/webchat.py), so the page sees a reply when it commits instead of at its next look, and asks once
instead of many times. A commit wakes the watches of other threads, not its own: a POST watches from
inside the transaction that stores its message.

Who wakes a waiting poll: a transaction that writes chat messages wakes the polls of those sessions
waiting in its own process once it has committed (bot/wakeup.py). For messages written by another
process (gunicorn's web processes beside a worker process):
- on PostgreSQL the transaction also sends NOTIFY recoverybot_chat '<session id> <sender>', which a
  listener here passes on unless this engine sent it (bot/wakeup.py: the commit hook told it already);
- on SQLite, which has no NOTIFY, a thread here reads `PRAGMA data_version` every TICK seconds while
  polls wait (it changes when another connection commits), and on a change asks once which waiting
  sessions have something new.
A poll also looks again every RECHECK seconds, so a missed notification (the listener reconnecting,
WORKER_LISTEN off) costs at most that much.

A waiting poll holds a request thread, and gunicorn's threads (8 per process) also answer Slack's
clicks, so only `limit` polls wait at once per process, and PER_CLIENT from one address. Past that a
poll answers at once, as a plain poll does, and the page looks again on its own schedule.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

from bot import wakeup
from recovery.models import ChatMessage

TABLE = ChatMessage.__tablename__

log = logging.getLogger(__name__)

MAX_WAIT = 20  # seconds a poll may ask to wait: under the usual 30 s proxy and load-balancer time-outs
RECHECK = 0.5  # seconds between a waiting poll's own looks, whatever it was told
TICK = 0.01  # SQLite: seconds between the watcher's looks at data_version while polls wait
SERVE_LIMIT = 64  # `recoverybot serve`: werkzeug starts a thread per request
GUNICORN_LIMIT = 4  # `recoverybot web`: half of each process's 8 threads
PER_CLIENT = 2  # waiting polls per client address: a page waits with one; two tabs of it with two


class ChatWaiters:
    """The polls waiting in this process, by chat session."""

    def __init__(self, db, *, limit: int = GUNICORN_LIMIT, per_client: int = PER_CLIENT, listen: bool = True,
                 recheck: float = RECHECK):
        self.db, self.limit, self.per_client, self.listen, self.recheck = db, limit, per_client, listen, recheck
        # SQLite under `recoverybot serve`: this process is the only writer, and its commits wake its
        # polls themselves, so there is nothing for the data_version watcher to find (serve sets False).
        self.watch_file = True
        self._lock = threading.Lock()
        # session -> {watch: (its `after`, the thread that waits on it)}
        self._waiting: dict[str, dict[threading.Event, tuple[int, int]]] = {}
        self._count = 0
        self._by_client: dict[str, int] = {}
        self._someone = threading.Event()  # SQLite: wakes the idle watcher
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    @contextmanager
    def watching(self, session_id: str, after: int, client: str = "") -> Iterator[threading.Event | None]:
        """An event that is set whenever a message of `session_id` past `after` may have been written,
        from now until the block ends; None (the caller answers at once) when `limit` polls already wait,
        or `per_client` polls from the same `client` (an IP address): sessions cost nothing to make, so one
        client could otherwise hold every waiting slot."""
        watch = threading.Event()
        with self._lock:
            if self._count >= self.limit or self._by_client.get(client, 0) >= self.per_client:
                watch = None
            else:
                self._count += 1
                self._by_client[client] = self._by_client.get(client, 0) + 1
                self._waiting.setdefault(session_id, {})[watch] = (after, threading.get_ident())
                self._someone.set()
        if watch is None:
            yield None
            return
        try:
            self._start_listener()
            yield watch
        finally:
            with self._lock:
                self._count -= 1
                self._by_client[client] -= 1
                if not self._by_client[client]:
                    del self._by_client[client]
                watches = self._waiting[session_id]
                del watches[watch]
                if not watches:
                    del self._waiting[session_id]

    @property
    def waiting(self) -> int:
        return self._count

    def written(self, session_ids: Iterable[str]) -> None:
        """Messages of these sessions were committed (called from the writer's thread). The writer's own
        watches are left alone: a POST that waits for the reply starts watching inside the transaction
        that stores the message, and its own commit is no news to it."""
        me = threading.get_ident()
        with self._lock:
            for session_id in session_ids:
                for watch, (_, owner) in self._waiting.get(session_id, {}).items():
                    if owner != me:
                        watch.set()

    def _notified(self, payload: str) -> None:
        if payload == wakeup.ANY:  # (re)connected: anything may have been written meanwhile
            with self._lock:
                for watches in self._waiting.values():
                    for watch in watches:
                        watch.set()
        else:
            self.written((payload,))

    def _start_listener(self) -> None:
        # Started by the first waiting poll, so a process that never serves the chat (the worker, a
        # one-off CLI command) holds no listening connection.
        if self._listener is not None or not self.listen:
            return
        with self._lock:
            if self._listener is not None or self._stop.is_set():
                return
            if self.db.is_postgres:
                self._listener = wakeup.listen(self.db, self._notified, self._stop, channel=wakeup.CHAT_CHANNEL,
                                               name="chat-listen") or threading.Thread()  # no driver support
            elif not self.watch_file:
                self._listener = threading.Thread()  # never started: nothing to watch
            else:
                self._listener = threading.Thread(target=self._watch_sqlite, name="chat-watch", daemon=True)
                self._listener.start()

    def _watch_sqlite(self) -> None:
        path = self.db.engine.url.database
        if not path or path == ":memory:":
            return  # a private database: every writer is in this process and wakes its polls itself
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._watch_file(path)
                return
            except sqlite3.Error:  # polls re-check on their own meanwhile; try again, less and less often
                log.warning("chat watcher lost %s; waiting polls re-check every %s s until it is back", path,
                            RECHECK, exc_info=True)
                self._stop.wait(delay)
                delay = min(30.0, delay * 2)

    def _watch_file(self, path: str) -> None:
        # A connection of its own, in autocommit, so each look reads the newest commit.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1)
        try:
            version = None  # the first look always asks: a commit may have come before this thread started
            while not self._stop.is_set():
                if not self._count:
                    self._someone.wait(1.0)
                    self._someone.clear()
                    continue
                now = _data_version(conn)
                if now != version:
                    version = now
                    # read after the version, so a poll that starts waiting later reads past this change
                    with self._lock:
                        waiting = {sid: min(after for after, _ in watches.values())
                                   for sid, watches in self._waiting.items()}
                    if waiting:
                        marks = ",".join("?" * len(waiting))
                        rows = conn.execute(f"SELECT session_id, max(seq) FROM {TABLE} WHERE session_id IN "
                                            f"({marks}) GROUP BY session_id", list(waiting)).fetchall()
                        self.written(sid for sid, top in rows if top > waiting[sid])
                self._stop.wait(TICK)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        listener = self._listener
        if listener is not None and listener.ident is not None:
            listener.join(timeout=5)


def _data_version(conn) -> int:
    return conn.execute("PRAGMA data_version").fetchone()[0]
