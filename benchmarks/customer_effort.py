#!/usr/bin/env python
"""Customer effort of a recovery: how many messages, link opens and form submits an honest customer
needs from "I lost my authenticator" to a new authenticator, in English and Traditional Chinese.

    .venv/bin/python benchmarks/customer_effort.py            # both languages, about 10 seconds
    options: --json FILE

It starts the real app (bot.wiring.build, bot.web.create_app) and its worker on 127.0.0.1 with a fresh
SQLite database and the demo accounts, and drives the scripted recovery through the HTTP API as the web
chat page does, counting what the customer does: each POST of a chat message, each emailed link opened,
each form submitted. Codes and links are read from the emails the local mailer writes. The approval is
staff work (the CLI's decide), not counted. The baseline is the target (5 messages, 1 link, 2 submits),
and every figure is printed as a ratio to it; the run exits 1 when any figure is over its target.
Figures: docs/performance.md ("Customer effort").
"""
from __future__ import annotations

import argparse
import logging
import json
import re
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyotp
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.wiring import build  # noqa: E402
from recovery import db as dbmod  # noqa: E402
from recovery.config import load_settings  # noqa: E402

TARGET = {"messages": 5, "links": 1, "submits": 2}
PASSWORD = "correct horse battery"  # the demo account's password (recovery/directory/demo.py)
SCRIPT = {  # what an honest customer types, in each language
    "en": ["I lost my authenticator", "alex@example.com", "{code}", "May 2023", "USDT"],
    "zh-TW": ["我遺失了驗證器", "alex@example.com", "{code}", "2023年5月", "USDT"],
}


@dataclass
class Effort:
    locale: str
    messages: int = 0
    links: int = 0
    submits: int = 0
    seconds: float = 0.0

    def over_target(self) -> list[str]:
        return [k for k, limit in TARGET.items() if getattr(self, k) > limit]


class Customer:
    """Talks to the app over HTTP like the chat page and a browser do, counting what it does."""

    def __init__(self, base: str, locale: str, mail_dir: Path):
        self.base, self.mail_dir, self.http = base, mail_dir, requests.Session()
        self.effort = Effort(locale)
        r = self.http.post(f"{base}/chat/api/sessions", json={"locale": locale}, timeout=10)
        r.raise_for_status()
        self.session, self.after = r.json()["session_id"], max(m["seq"] for m in r.json()["messages"])

    def say(self, text: str) -> str:
        self.effort.messages += 1
        self.http.post(f"{self.base}/chat/api/sessions/{self.session}/messages", json={"text": text},
                       timeout=10).raise_for_status()
        return self.reply()

    def reply(self, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.http.get(f"{self.base}/chat/api/sessions/{self.session}/messages",
                                params={"after": self.after}, timeout=10).json()["messages"]
            if got:
                self.after = got[-1]["seq"]
                bot = [m["text"] for m in got if m["sender"] == "bot"]
                if bot:
                    return bot[-1]
            time.sleep(0.05)
        raise RuntimeError("no reply from the bot")

    def email(self, template: str, timeout: float = 15) -> str:
        """The text of the newest email of `template` the local mailer wrote."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.mail_dir.glob(f"*-{template}.eml"))
            if found:
                import email
                from email.policy import default
                msg = email.message_from_bytes(found[-1].read_bytes(), policy=default)
                return msg.get_body(preferencelist=("plain",)).get_content()
            time.sleep(0.05)
        raise RuntimeError(f"no {template} email")

    def open_link(self, url: str) -> str:
        self.effort.links += 1
        r = self.http.get(url, timeout=10)
        r.raise_for_status()
        return r.text

    def submit(self, url: str, form: dict) -> str:
        self.effort.submits += 1
        r = self.http.post(url, data=form, timeout=10)
        r.raise_for_status()
        return r.text


@contextmanager
def running_app(folder: str, **settings):
    """The real app and worker on 127.0.0.1 over a fresh SQLite database in `folder`, demo accounts
    loaded, mail written to `folder`/mail; yields (container, base URL)."""
    from werkzeug.serving import make_server

    from bot.web import create_app
    from tests.conftest import free_port
    from tests.helpers import load_demo

    url = f"sqlite:///{folder}/bot.db"
    dbmod.upgrade(url)
    port = free_port()
    c = build(load_settings(DATABASE_URL=url, SECRET_KEY="benchmark-secret-key-0123456789-abcdefgh",
                            MAIL_OUTBOX_DIR=f"{folder}/mail", PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
                            **settings))
    load_demo(c)
    server = make_server("127.0.0.1", port, create_app(c), threaded=True)
    threads = [threading.Thread(target=server.serve_forever, daemon=True),
               threading.Thread(target=c.worker.run_forever, daemon=True)]
    for t in threads:
        t.start()
    try:
        yield c, f"http://127.0.0.1:{port}"
    finally:
        c.worker.stop()
        server.shutdown()
        c.close()


def recover(locale: str) -> Effort:
    """One scripted recovery on a fresh server; returns what it took."""
    with tempfile.TemporaryDirectory() as tmp, running_app(tmp) as (c, base):
        started = time.monotonic()
        customer = Customer(base, locale, Path(tmp) / "mail")
        answer = ""
        for line in SCRIPT[locale]:
            if "{code}" in line:
                line = re.search(r"\b(\d{6})\b", customer.email("verification_code")).group(1)
            answer = customer.say(line)
        case_id = re.search(r"RC-[A-Z0-9]{8}", answer).group(0)
        c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")  # staff work
        link = re.search(r"https?://\S+/enroll/[A-Za-z0-9_\-]+", customer.email("enroll_link")).group(0)
        customer.open_link(link)
        setup = customer.submit(link, {"step": "start", "password": PASSWORD})
        secret = re.search(r'id="setup-key">([A-Z2-7 ]+)<', setup).group(1).replace(" ", "")
        done = customer.submit(link, {"step": "confirm", "code": pyotp.TOTP(secret).now()})
        assert 'id="recovery-codes"' in done, "the enroll page did not finish"
        with c.recovery.service() as svc:
            assert svc.get(case_id).state == "completed"
        customer.effort.seconds = round(time.monotonic() - started, 2)
        return customer.effort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would bury the figures
    results = [recover(locale) for locale in SCRIPT]
    print(f"{'language':<8} {'messages':>9} {'links':>6} {'submits':>8}   ratio to target (5 / 1 / 2)")
    for e in results:
        ratios = " / ".join(f"{getattr(e, k) / v:.2f}" for k, v in TARGET.items())
        print(f"{e.locale:<8} {e.messages:>9} {e.links:>6} {e.submits:>8}   {ratios}   ({e.seconds} s)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(e) for e in results], indent=2))
    over = {e.locale: e.over_target() for e in results if e.over_target()}
    if over:
        print(f"OVER TARGET: {over}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
