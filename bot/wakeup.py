"""Cross-process wake-up on PostgreSQL: a transaction that stores an inbox event or an outbox message
sends a NOTIFY, which PostgreSQL delivers when (and only if) it commits; the worker LISTENs on a
connection of its own and starts a pass at once instead of on its next idle tick. A transaction that
writes web-chat messages notifies CHAT_CHANNEL with each session's id, for the web chat's waiting polls
(bot/chatwait.py), and tells the polls waiting in its own process once it has committed. Each payload
names its sender (tagged), and a listener leaves out what its own engine sent: the commit hook has told
that process already.

Polling stays: a worker that is not listening (reconnecting after a database restart, or WORKER_LISTEN
off because a pooler in transaction mode cannot carry LISTEN) still finds the work on its next tick.
On SQLite there is one process (`recoverybot serve`): there the commit itself tells the worker thread
(install's `on_committed`), and a route that stores on a plain connection, outside the session and its
hooks (a Slack submission), calls `Worker.wake()`.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Callable

from sqlalchemy import event, func, select

from recovery.models import ChatMessage, InboxEvent, OutboxMessage

log = logging.getLogger(__name__)

CHANNEL = "recoverybot_work"
CHAT_CHANNEL = "recoverybot_chat"  # payload: the chat session's id
INBOX, EMAIL, OUTBOX = "inbox", "email", "outbox"  # what was stored; EMAIL wakes the mail loop only
ANY = "any"  # (re)connected: whatever was stored while not listening is waiting
RECONNECT_FIRST, RECONNECT_CAP = 0.2, 2.0  # seconds between attempts while the database is down
_BOOT = secrets.token_hex(8)  # see origin()


def install(db, on_committed: Callable[[set, set], None] | None = None) -> None:
    """Make every write transaction of `db` that adds inbox events or outbox messages notify on commit
    (PostgreSQL), and call `on_committed(stored, chats)` once it has committed (any database): `stored`
    the kinds it stored (INBOX, EMAIL, OUTBOX), `chats` the chat sessions it wrote messages of.
    The hooks are installed once per `db`; a second call (a second container on the same `db`) adds its
    `on_committed`, since the engine's own listeners leave out what it sends (tagged): every container
    on it must hear its commits this way."""
    callbacks = db.__dict__.setdefault("_wake_callbacks", [])
    if on_committed is not None:
        callbacks.append(on_committed)
    if event.contains(db.sessions, "after_flush", _note_flushed):
        return
    event.listen(db.sessions, "after_flush", _note_flushed)
    event.listen(db.sessions, "do_orm_execute", _note_inserted)
    event.listen(db.sessions, "after_rollback", _forget)

    def committed(session) -> None:
        if session.in_nested_transaction():
            return  # a savepoint's release (SQLAlchemy calls this hook for it too): nothing is committed yet
        stored = session.info.pop("recoverybot_stored", None) or set()
        chats = session.info.pop("recoverybot_chats", None) or set()
        session.info.pop("recoverybot_announced", None)
        if stored or chats:
            for callback in callbacks:
                callback(stored, chats)

    event.listen(db.sessions, "after_commit", committed)
    if db.is_postgres:
        event.listen(db.sessions, "before_commit", _notify)


# What a transaction stored is noted as it goes and announced once, just before it commits: one
# statement per transaction, whatever it wrote. NOTIFY is transactional, so a transaction that fails to
# commit notifies nobody.
def _stored(session) -> set:
    return session.info.setdefault("recoverybot_stored", set())


def _chats(session) -> set:
    return session.info.setdefault("recoverybot_chats", set())


def _note_flushed(session, _flush_context) -> None:
    for obj in session.new:  # still lists what this flush inserted
        if isinstance(obj, ChatMessage):
            _chats(session).add(obj.session_id)
        elif isinstance(obj, InboxEvent):
            _stored(session).add(INBOX)
        elif isinstance(obj, OutboxMessage):
            _stored(session).add(EMAIL if obj.kind == "email" else OUTBOX)


def _note_inserted(state) -> None:
    # The inbox and the outbox store with one INSERT ... ON CONFLICT statement each, and chat lines (the
    # customer's and the bot's) are written with a plain INSERT, none of which a flush sees; the outbox and
    # the chat lines pass their rows as parameters (one, or a list), so the kind and the session can be
    # read here. A duplicate that inserts nothing still notifies: the worker then finds nothing new, which
    # costs one empty pass. (A chat INSERT with .values() instead would wake nobody: waiting requests
    # would see its line on their re-check.)
    table, rows = inserted(state)
    if table == InboxEvent.__tablename__:
        _stored(state.session).add(INBOX)
        return
    if table == OutboxMessage.__tablename__:  # without its row, an outbox message of any kind but email
        _stored(state.session).update({EMAIL if row.get("kind") == "email" else OUTBOX for row in rows} or {OUTBOX})
    elif table == ChatMessage.__tablename__:
        _chats(state.session).update(row["session_id"] for row in rows if isinstance(row.get("session_id"), str))


def inserted(state) -> tuple[str | None, list[dict]]:
    """For a do_orm_execute hook: the table an INSERT statement writes and the rows it was given as
    parameters (one, or a list of them; none for an INSERT with .values()); (None, []) for any other
    statement."""
    if not state.is_insert:
        return None, []
    table = getattr(getattr(state.statement, "table", None), "name", None)
    rows = state.parameters if isinstance(state.parameters, list) else [state.parameters]
    return table, [row for row in rows if isinstance(row, dict)]


def _notify(session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint's release; the real commit announces it with the rest
    session.flush()  # commit flushes after this hook: what is still pending (a chat reply) is noted now
    stored = session.info.get("recoverybot_stored") or ()  # kept for the after_commit call, as are chats
    chats = set(session.info.get("recoverybot_chats") or ()) - session.info.get("recoverybot_announced", set())
    if stored or chats:
        bind = session.get_bind()
        session.connection().execute(select(
            *(func.pg_notify(CHANNEL, tagged(what, bind)) for what in sorted(stored)),
            *(func.pg_notify(CHAT_CHANNEL, tagged(chat, bind)) for chat in sorted(chats))))


def announced(session, chat: str) -> None:
    """A statement of `session`'s transaction already ran pg_notify(CHAT_CHANNEL, chat): the commit
    need not again."""
    session.info.setdefault("recoverybot_announced", set()).add(chat)


def announcing(statement, bind, what: str = INBOX):
    """`statement` (an INSERT ... RETURNING id) with the NOTIFY in the same statement, for a caller that
    runs it on a plain connection of `bind` (an engine), outside the session hooks above: one round trip
    instead of two, which is a third of what acknowledging a Slack submission costs the web process.
    Its own process's worker is not told by this NOTIFY (see tagged): the caller wakes it."""
    stored = statement.cte("stored")
    return select(select(stored.c.id).scalar_subquery().label("id"),
                  func.pg_notify(CHANNEL, tagged(what, bind)))


def _forget(session) -> None:
    if session.in_nested_transaction():
        # A savepoint rolled back: what the enclosing transaction stored is still to be announced, but a
        # pg_notify run inside the savepoint is undone with it, so the commit announces every chat again.
        session.info.pop("recoverybot_announced", None)
        return
    for key in ("recoverybot_stored", "recoverybot_chats", "recoverybot_announced"):
        session.info.pop(key, None)


def listen(db, on_notify: Callable[[str], None], stop: threading.Event, *, channel: str = CHANNEL,
           name: str = "worker-listen") -> threading.Thread | None:
    """Start a thread that calls `on_notify(payload)` for each notification on `channel`, and
    `on_notify(ANY)` on each (re)connect, until `stop` is set; None (polling only) on SQLite or with a
    driver that cannot receive notifications."""
    if not db.is_postgres:
        return None
    dialect = db.engine.dialect
    if not hasattr(dialect.loaded_dbapi, "Connection") or not hasattr(dialect.loaded_dbapi.Connection, "notifies"):
        log.warning("the PostgreSQL driver cannot LISTEN; %s is not started, polling covers it", name)
        return None
    thread = threading.Thread(target=_run, args=(db, on_notify, stop, channel), name=name, daemon=True)
    thread.start()
    return thread


def _connect(db, channel: str):
    """A connection outside the pool (it is held for as long as the worker runs), made with the same
    arguments SQLAlchemy uses, with keepalives so a vanished server is noticed."""
    dialect = db.engine.dialect
    cargs, cparams = dialect.create_connect_args(db.engine.url)
    cparams = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
               "connect_timeout": 5} | dict(cparams)
    conn = dialect.loaded_dbapi.connect(*cargs, **cparams)
    try:
        conn.autocommit = True
        conn.execute(f"LISTEN {channel}")
    except BaseException:
        conn.close()
        raise
    return conn


def _run(db, on_notify, stop: threading.Event, channel: str) -> None:
    delay = RECONNECT_FIRST
    connected_before = False
    while not stop.is_set():
        try:
            conn = _connect(db, channel)
        except Exception as exc:  # noqa: BLE001 - the database is down or restarting: try again soon
            if connected_before and delay == RECONNECT_FIRST:
                log.warning("%s listener lost the database (%s); reconnecting", channel, type(exc).__name__)
            stop.wait(delay)
            delay = min(RECONNECT_CAP, delay * 2)
            continue
        if connected_before:
            log.info("%s listener reconnected", channel)
        connected_before, delay = True, RECONNECT_FIRST
        on_notify(ANY)  # anything stored while nobody listened
        try:
            _receive(conn, on_notify, stop, origin(db.engine))
        except Exception as exc:  # noqa: BLE001 - connection lost: reconnect (polling covers the gap)
            log.warning("%s listener lost the database (%s); reconnecting", channel, type(exc).__name__)
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass


def _receive(conn, on_notify, stop: threading.Event, me: str) -> None:
    # notifies(timeout=...) (psycopg 3.2) returns after its timeout, so `stop` is seen within a second; a
    # connection the server closed (a restart) raises from it, which sends us back to reconnect.
    while not stop.is_set():
        for note in conn.notifies(timeout=1.0):
            what, _, sender = note.payload.partition(" ")
            if sender != me:  # what this engine committed, its commit hook has told already (install)
                on_notify(what)


def origin(bind) -> str:
    """The sender a NOTIFY payload names: this engine (a session's bind, a connection or an engine) in
    this process. A random word drawn when the module is imported tells hosts and process images apart,
    the pid processes forked from one image (gunicorn's), the engine's id the containers of one process
    (tests run a worker's beside a web one's)."""
    return f"{_BOOT}.{os.getpid()}.{id(getattr(bind, 'engine', bind))}"


def tagged(what: str, bind) -> str:
    """A NOTIFY payload: `what` (a kind, or a chat session's id) and its sender (origin), so the sender's
    own listener leaves it out: a worker's turn that queues an outbox message, or a chat POST that waits
    for its reply, was otherwise woken by its own commit, a pass or a read for nothing. A payload
    without a sender (from a release before this one, during a rolling deploy) is passed on; a release
    before this one takes a tagged payload for an unknown kind or session, so until every process runs
    this one, its workers and waiting requests find such work on their idle tick or re-check."""
    return f"{what} {origin(bind)}"
