"""SQLite's writers of one process queue on a lock (recovery/db._Writer) instead of SQLite's busy
handler: every writer gets its turn, the lock is given back however a transaction ends, and a writer
that waits on itself fails as SQLite would (an outage, so a request gets 503), instead of hanging."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from recovery.db import Database, is_outage


@pytest.fixture
def db(sqlite_url):
    database = Database(sqlite_url, busy_seconds=0.5)
    with database.transaction() as s:
        s.execute(text("CREATE TABLE tally (thread INTEGER, n INTEGER)"))
    yield database
    database.dispose()


def rows(db) -> int:
    with db.reading() as s:
        return s.execute(text("SELECT COUNT(*) FROM tally")).scalar_one()


def test_writers_of_many_threads_all_get_their_turn(db):
    def write(i):
        for n in range(25):
            with db.transaction() as s:
                s.execute(text("INSERT INTO tally VALUES (:i, :n)"), {"i": i, "n": n})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert rows(db) == 8 * 25


def test_the_lock_is_given_back_however_the_transaction_ends(db):
    with pytest.raises(ZeroDivisionError):
        with db.transaction() as s:
            s.execute(text("INSERT INTO tally VALUES (1, 1)"))
            1 / 0
    with pytest.raises(OperationalError):  # a failing statement
        with db.transaction() as s:
            s.execute(text("INSERT INTO no_such_table VALUES (1)"))
    with db.engine.connect() as conn:  # a Core connection that commits and goes on writing
        conn.execute(text("INSERT INTO tally VALUES (2, 1)"))
        conn.commit()
        conn.execute(text("INSERT INTO tally VALUES (2, 2)"))
        conn.commit()
    started = time.monotonic()
    with db.transaction() as s:  # no wait: nothing holds the lock
        s.execute(text("INSERT INTO tally VALUES (3, 1)"))
    assert time.monotonic() - started < 0.25
    assert rows(db) == 3


def test_a_writer_waiting_on_itself_fails_as_an_outage_and_the_first_one_still_commits(db):
    started = time.monotonic()
    with db.transaction() as outer:
        outer.execute(text("INSERT INTO tally VALUES (1, 1)"))
        with pytest.raises(OperationalError) as raised:
            with db.transaction() as inner:
                inner.execute(text("INSERT INTO tally VALUES (1, 2)"))
        assert "database is locked" in str(raised.value) and is_outage(raised.value)
    assert 0.45 < time.monotonic() - started < 5
    assert rows(db) == 1
    with db.transaction() as s:
        s.execute(text("INSERT INTO tally VALUES (1, 3)"))
    assert rows(db) == 2


def test_a_reader_takes_no_turn(db):
    with db.transaction() as s:
        s.execute(text("INSERT INTO tally VALUES (1, 1)"))
        started = time.monotonic()
        assert rows(db) == 0  # reads while a writer holds the lock, without waiting for it
        assert time.monotonic() - started < 0.25


@pytest.mark.parametrize("round_", range(6))
def test_writers_take_turns_in_the_order_they_came(db, round_):
    """A thread that writes again and again does not jump the queue: a writer that came while its first
    transaction was open writes right after it. (With a plain lock the releasing thread often took it
    straight back: this failed in about one run of three.)"""
    order, first_open, release_first = [], threading.Event(), threading.Event()

    def busy():
        for n in range(20):
            with db.transaction() as s:
                s.execute(text("INSERT INTO tally VALUES (1, :n)"), {"n": n})
                if n == 0:
                    first_open.set()
                    release_first.wait(5)
            order.append("busy")

    def late():
        with db.transaction() as s:
            s.execute(text("INSERT INTO tally VALUES (2, 0)"))
        order.append("late")

    a = threading.Thread(target=busy)
    a.start()
    assert first_open.wait(5)
    b = threading.Thread(target=late)
    b.start()
    time.sleep(0.1)  # b is queued behind the open transaction
    release_first.set()
    a.join(30)
    b.join(30)
    assert order.index("late") <= 1, order  # right after the first
