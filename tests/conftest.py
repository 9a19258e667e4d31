"""Shared fixtures: real SQLite and PostgreSQL databases, a real SMTP server (aiosmtpd), the real app
served over HTTP, and a chat client that talks to it like the web page does."""
from __future__ import annotations

import contextlib
import email
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import default as default_policy

import pytest
import requests
from sqlalchemy import create_engine, text

from bot.wiring import build
from recovery import db as dbmod
from recovery.config import load_settings
from recovery.models import Base

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "test-secret-key-0123456789-abcdefghijklmnop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- databases -------------------------------------------------------------------------------------

@contextmanager
def scratch_pg_database(prefix: str):
    """A new, empty PostgreSQL database for the caller (dropped afterwards); its URL. Without a server the
    test is skipped, except in CI, where that is a failure."""
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_server_url():
    """A fresh PostgreSQL database for this test session, schema migrated once."""
    with scratch_pg_database("rb_test") as url:
        dbmod.upgrade(url)
        yield url


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def pg_url(pg_server_url):
    _truncate(pg_server_url)
    return pg_server_url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """A SQLite file migrated once per session; each test gets a copy (an Alembic run costs 0.1 s)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "bot.db"
    dbmod.upgrade(f"sqlite:///{path}")
    # fold the write-ahead log into the file, so the file alone is the whole database
    with contextlib.closing(sqlite3.connect(path)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and not path.with_name("bot.db-wal").exists(), "the template's log was not folded in"
    return path


@pytest.fixture
def sqlite_url(tmp_path, sqlite_template):
    path = tmp_path / "bot.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request):
    """Runs the test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


# ---- the application ---------------------------------------------------------------------------------

@pytest.fixture
def make_container(tmp_path):
    built = []

    def make(db_url: str, *, clock=None, **settings):
        settings.setdefault("SECRET_KEY", SECRET)
        settings.setdefault("MAIL_OUTBOX_DIR", str(tmp_path / "mail"))
        settings.setdefault("PUBLIC_BASE_URL", "http://127.0.0.1:9")
        container = build(load_settings(DATABASE_URL=db_url, **settings), clock=clock)
        built.append(container)
        return container

    yield make
    for c in built:
        c.close()


class LiveServer:
    def __init__(self, container, port: int):
        from werkzeug.serving import make_server

        from bot.web import create_app

        self.container = container
        self.url = f"http://127.0.0.1:{port}"
        self.app = create_app(container)
        self.server = make_server("127.0.0.1", port, self.app, threaded=True)
        # a short poll, so stop() (shutdown) returns within 10 ms rather than socketserver's 0.5 s
        self.threads = [threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)]

    def start(self, *, worker: bool):
        if worker:
            self.threads.append(threading.Thread(target=self.container.worker.run_forever, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.container.worker.stop()
        self.server.shutdown()


@pytest.fixture
def live(make_container):
    """live(db_url, worker=True, **settings) -> a running server whose PUBLIC_BASE_URL is itself."""
    servers = []

    def start(db_url: str, *, worker: bool = True, clock=None, **settings):
        port = free_port()
        settings.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
        server = LiveServer(make_container(db_url, clock=clock, **settings), port).start(worker=worker)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


# ---- mail --------------------------------------------------------------------------------------------

class Mailbox:
    """Messages received by a real SMTP server, with helpers to find codes and links."""

    def __init__(self):
        self.messages: list[EmailMessage] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=default_policy)
        msg["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
        with self.lock:
            self.messages.append(msg)
        return "250 OK"

    def find(self, template: str, to: str | None = None) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if m["X-Recovery-Template"] == template
                    and (to is None or m["To"] == to)]

    def wait_for(self, template: str, to: str | None = None, timeout: float = 10, count: int = 1) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(template, to)
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.05)
        raise AssertionError(f"no {template!r} email (to {to}) within {timeout}s; have "
                             f"{[m['X-Recovery-Template'] for m in self.messages]}")


def text_part(msg: EmailMessage) -> str:
    return msg.get_body(preferencelist=("plain",)).get_content()


def code_in(msg: EmailMessage) -> str:
    return re.search(r"\b(\d{6})\b", text_part(msg)).group(1)


def link_in(msg: EmailMessage, kind: str) -> str:
    return re.search(rf"https?://\S+/{kind}/[A-Za-z0-9_\-]+", text_part(msg)).group(0)


@pytest.fixture
def smtp():
    """A real SMTP server (aiosmtpd) on localhost; yields (SMTP_URL, Mailbox)."""
    from aiosmtpd.controller import Controller

    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield f"smtp://127.0.0.1:{port}", box
    controller.stop()


# ---- the customer ------------------------------------------------------------------------------------

class ChatClient:
    """Talks to /chat/api like the web page does."""

    def __init__(self, base_url: str, locale: str = "en"):
        self.base = base_url
        r = requests.post(f"{base_url}/chat/api/sessions", json={"locale": locale}, timeout=10)
        assert r.status_code == 201, r.text
        self.session_id = r.json()["session_id"]
        self.seen = r.json()["messages"]
        self.after = max(m["seq"] for m in self.seen)
        self.unread: list[str] = []

    def say(self, text: str, client_id: str | None = None) -> requests.Response:
        body = {"text": text} | ({"client_id": client_id} if client_id else {})
        r = requests.post(f"{self.base}/chat/api/sessions/{self.session_id}/messages", json=body, timeout=10)
        assert r.status_code == 202, r.text
        return r

    def poll(self) -> list[dict]:
        r = requests.get(f"{self.base}/chat/api/sessions/{self.session_id}/messages",
                         params={"after": self.after}, timeout=10)
        new = r.json()["messages"]
        if new:
            self.after = new[-1]["seq"]
            self.seen.extend(new)
        return new

    def reply(self, timeout: float = 10) -> str:
        """Wait for the bot's next unread message and return its text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.unread.extend(m["text"] for m in self.poll() if m["sender"] == "bot")
            if self.unread:
                return self.unread.pop(0)
            time.sleep(0.05)
        raise AssertionError(f"no bot reply within {timeout}s; transcript: {[m['text'] for m in self.seen]}")

    def ask(self, text: str, timeout: float = 10) -> str:
        self.say(text)
        return self.reply(timeout)
