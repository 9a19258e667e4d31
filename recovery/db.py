"""Engine, sessions and migrations.

SQLite runs every transaction as BEGIN IMMEDIATE (one writer at a time, WAL for readers), which gives the
same "one decision under concurrent clicks" guarantee that row locks give on PostgreSQL.
"""
from __future__ import annotations

import sqlite3
import threading
from collections import deque
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, exc as sa_exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

# The Alembic scripts ship inside this package; Alembic resolves "package:folder" through
# importlib.resources, so an installed wheel migrates as well as a source checkout.
MIGRATIONS = "recovery:migrations"


READ_ONLY = "recoverybot_read_only"
SQLITE_BUSY_SECONDS = 30  # how long a SQLite writer waits for the one before it

# SQLSTATEs of a server that is going away or cannot take the connection: connection exceptions (class
# 08), admin/crash shutdown, cannot connect now, too many connections.
_GONE = ("08", "57P01", "57P02", "57P03", "53300")


def is_outage(exc: BaseException | None) -> bool:
    """Whether the error (or one it was raised from) means the database could not be reached: refused or
    dropped connections, a server shutting down, no pool connection free in time, SQLite's file locked
    past the busy timeout. A deadlock, a statement timeout or a schema error is not an outage: retrying
    the same request would meet it again, and it must show as the error it is."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, sa_exc.TimeoutError):  # the pool had no connection to give in time
            return True
        if isinstance(exc, sa_exc.DBAPIError):
            if exc.connection_invalidated:
                return True
            orig = exc.orig
            state = getattr(orig, "sqlstate", None)
            if state is not None:
                return state.startswith(_GONE)
            if isinstance(exc, sa_exc.OperationalError):
                # psycopg: no SQLSTATE means no server answered (refused, reset, closed);
                # sqlite3: only a lock that outlasted the busy timeout is transient.
                return "sqlite" not in type(orig).__module__ or "database is locked" in str(orig)
            if isinstance(exc, sa_exc.InterfaceError):
                return True  # the connection was closed under us
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def driver_error(exc: BaseException) -> str:
    """The error's class and the driver's own (say OperationalError/ConnectionTimeout), never its message,
    which can name the database host and user: what a log line may say about a failed database call."""
    orig = getattr(exc, "orig", None)
    return f"{type(exc).__name__}/{type(orig).__name__}" if orig is not None else type(exc).__name__


def insert_new(session_or_dialect, model, unique):
    """An INSERT into `model`'s table that skips a row whose `unique` column is already stored (ON CONFLICT
    DO NOTHING), with no look-up first; each database spells it with a construct of its own. Takes the
    session it will run in, or the dialect's name.

    Built on the table, not the mapped class: the session then runs it as a plain statement instead of
    through the ORM's bulk-insert path."""
    from sqlalchemy.dialects import postgresql, sqlite

    name = session_or_dialect if isinstance(session_or_dialect, str) else \
        session_or_dialect.get_bind().dialect.name
    dialect = postgresql if name == "postgresql" else sqlite
    table = model.__table__
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[table.c[unique.key]])


class _Writer:
    """SQLite allows one writer at a time. A second one meets SQLITE_BUSY and waits in SQLite's busy
    handler, which sleeps in steps of up to 100 ms and tries again, so under steady writes from this
    process's own threads (the web threads' stores, the worker's turns) an unlucky writer lost again and
    again: a chat message's store waited up to 0.75 s, and its reply as long. Writers of this process
    queue here instead, first come first served, before BEGIN IMMEDIATE, and the turn passes on when the
    connection returns to the pool; the busy handler is left to other processes. A writer that waits
    longer than the busy timeout fails as SQLite would, so one that waits on itself (a second write
    transaction opened inside a first) fails rather than hangs."""

    def __init__(self, wait: float):
        self.wait = wait
        self.holder = None  # the DBAPI connection whose transaction writes now
        self._mutex = threading.Lock()
        self._queue: deque[tuple[object, threading.Event]] = deque()

    def take(self, dbapi_conn) -> None:
        with self._mutex:
            if self.holder is dbapi_conn:
                return  # this connection's next transaction (a Core connection that committed and goes on)
            if self.holder is None and not self._queue:
                self.holder = dbapi_conn
                return
            turn = (dbapi_conn, threading.Event())
            self._queue.append(turn)
        try:
            if turn[1].wait(self.wait):
                return  # handed over by give_back: holder is this connection
        except BaseException:  # interrupted (Ctrl-C in a CLI command): leave the queue as if never here
            with self._mutex:
                if self.holder is dbapi_conn:
                    self._pass_on()
                else:
                    self._queue.remove(turn)
            raise
        with self._mutex:
            if self.holder is dbapi_conn:
                return  # handed over just as the wait ran out
            self._queue.remove(turn)
        raise sa_exc.OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError(
            f"database is locked: this process's other writers held it for {self.wait:g} s"))

    def give_back(self, dbapi_conn) -> None:
        with self._mutex:
            if dbapi_conn is not None and self.holder is dbapi_conn:
                self._pass_on()

    def _pass_on(self) -> None:  # called with the mutex held
        if self._queue:
            self.holder, handed = self._queue.popleft()
            handed.set()
        else:
            self.holder = None


def make_engine(url: str, *, busy_seconds: float = SQLITE_BUSY_SECONDS, **kwargs) -> Engine:
    """`busy_seconds`: SQLite only, how long a writer waits for the one before it, then fails."""
    # A failing statement's error names its bound values unless told not to, and errors are logged and
    # kept (an inbox event's last_error): a denial's reason or a sealed value would be at rest in the clear.
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and ":memory:" not in url:
            Path(url[len("sqlite:///"):]).resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_seconds, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_seconds * 1000)}")
            # Deleted rows are overwritten with zeros instead of lingering in free space, so purged
            # personal data is gone from the file, not just unreachable.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        writer = _Writer(busy_seconds)

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # Readers (Database.reading) take no write lock: under WAL they never block a writer.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
                return
            dbapi_conn = conn.connection.dbapi_connection
            writer.take(dbapi_conn)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                writer.give_back(dbapi_conn)
                raise

        # The transaction is over once its connection is back in the pool (or thrown away).
        event.listen(engine, "checkin", lambda dbapi_conn, _record: writer.give_back(dbapi_conn))
        event.listen(engine, "invalidate", lambda dbapi_conn, _record, _exc: writer.give_back(dbapi_conn))
        event.listen(engine, "close", lambda dbapi_conn, _record: writer.give_back(dbapi_conn))
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survives a PostgreSQL restart without a manual step
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


class Database:
    """An engine plus a session factory; `transaction()` is the unit of work."""

    def __init__(self, url: str, **engine_kwargs):
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.readers = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions() as session:
            with session.begin():
                yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A unit of work that only reads (metrics, readiness, reports): on SQLite it takes no write
        lock, so a long read never holds up a decision. Nothing it changes is kept."""
        with self.readers() as session:
            session.begin()
            try:
                yield session
            finally:
                session.rollback()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def revision(self) -> str | None:
        """The schema revision the database is at (None before the first upgrade)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.execution_options(**{READ_ONLY: True}).connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self) -> None:
        upgrade(self.url)

    def scrub(self) -> None:
        """After a purge on SQLite: move the write-ahead log into the database file and empty it, so no
        copy of a purged page survives in the log (the file's own pages were zeroed by secure_delete).
        PostgreSQL reclaims deleted rows itself (autovacuum)."""
        if self.is_postgres:
            return
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cursor.close()
        finally:
            raw.close()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the schema to the newest revision; running it again changes nothing."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


@cache
def head_revision() -> str:
    """The newest revision the shipped migrations define: what this code expects."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
