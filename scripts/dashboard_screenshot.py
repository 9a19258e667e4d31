"""Render docs/dashboard.png: two weeks of recoveries run through the real code, drawn by
`recoverybot report --svg`, photographed by headless Chromium.

    python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--seed 7]

Grafana cannot run here, so the dashboard's panels (funnel, where cases stop, time to decision and to
complete, the queue, cases per day) are drawn by the report command from the same database. Every case
is opened, verified, decided, enrolled, cancelled or left to expire through the domain services and the
worker, with a manual clock walking through the fortnight.
"""
from __future__ import annotations

import argparse
import heapq
import logging
import os
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from itertools import count
from pathlib import Path

import pyotp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.wiring import build  # noqa: E402
from recovery import db as dbmod  # noqa: E402
from recovery.clock import ManualClock  # noqa: E402
from recovery.config import load_settings  # noqa: E402
from recovery.errors import RecoveryError  # noqa: E402
from tests.conftest import SECRET, link_in  # noqa: E402
from tests.helpers import account, folder_mails, last_mail, load_accounts, open_case, pass_checks  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
DAYS = 14


class Simulation:
    """A queue of timed actions; each runs at its time on the manual clock, after the worker has
    fired whatever fell due before it."""

    def __init__(self, c, rng: random.Random, accounts: list[dict]):
        self.c, self.rng, self.free = c, rng, list(accounts)
        self.queue, self.seq = [], count()

    def at(self, when: datetime, action, *args) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), action, args))

    def run(self, until: datetime) -> None:
        while self.queue and self.queue[0][0] < until:
            when, _, action, args = heapq.heappop(self.queue)
            self.c.clock.advance(seconds=max(0.0, (when - self.c.clock.now()).total_seconds()))
            self.c.worker.drain()
            action(*args)
        self.c.clock.advance(seconds=max(0.0, (until - self.c.clock.now()).total_seconds()))
        self.c.worker.drain()

    def later(self, minutes_low: float, minutes_high: float) -> datetime:
        return self.c.clock.now() + timedelta(minutes=self.rng.uniform(minutes_low, minutes_high))

    # ---- what customers and approvers do --------------------------------------------------------------

    def open(self) -> None:
        roll = self.rng.random()
        if roll < 0.12:  # an address that matches no account: a case that can never pass
            open_case(self.c, f"nobody{self.rng.randrange(10**6)}@example.net")
            return
        acct = self.free.pop(self.rng.randrange(len(self.free)))
        case_id = open_case(self.c, acct["email"])
        if roll < 0.19:
            self.at(self.later(1, 5), self.wrong_codes, case_id)
        elif roll < 0.27:
            return  # never types the code: the case expires after a day
        else:
            self.at(self.later(1, 8), self.verify, case_id, acct)

    def wrong_codes(self, case_id: str) -> None:
        with self.c.recovery.service() as svc:
            for _ in range(self.c.deps.policy.code_max_wrong):
                svc.submit_code(case_id, "000000")

    def verify(self, case_id: str, acct: dict) -> None:
        pass_checks(self.c, case_id)
        self.at(self.later(4, 300), self.decide, case_id, acct)

    def decide(self, case_id: str, acct: dict) -> None:
        if self.rng.random() < 0.1:  # someone who is not an approver clicks first
            try:
                self.c.recovery.decide(case_id, approver="mallory", decision="approve", channel="cli")
            except RecoveryError:
                pass
        if self.rng.random() < 0.12:
            self.c.recovery.decide(case_id, approver="bob", decision="deny", channel="cli",
                                   reason="the account facts did not match the customer's story")
            return
        self.c.recovery.decide(case_id, approver=self.rng.choice(["alice", "bob"]), decision="approve",
                               channel="cli")
        self.c.worker.drain()
        roll = self.rng.random()
        if roll < 0.82:
            self.at(self.later(3, 50), self.enroll, case_id, acct)
        elif roll < 0.9:
            self.at(self.later(2, 30), self.owner_cancels, case_id)
        # else the link is never used and expires

    def enroll(self, case_id: str, acct: dict) -> None:
        # the newest link: the unused-link reminder replaces the first one
        mails = [m for m in folder_mails(self.c, case_id=case_id)
                 if m["X-Recovery-Template"] in ("enroll_link", "link_reminder")]
        token = link_in(mails[-1], "enroll").rsplit("/", 1)[1]
        view, browser = self.c.recovery.start_setup(token, acct["password"], None)
        self.c.recovery.confirm_enroll(token, pyotp.TOTP(view.secret).at(self.c.clock.now()), browser)

    def owner_cancels(self, case_id: str) -> None:
        token = link_in(last_mail(self.c, "reset_requested", case_id), "cancel").rsplit("/", 1)[1]
        self.c.recovery.cancel_by_owner(token)


def simulate(url: str, mail_dir: Path, seed: int, end: datetime) -> None:
    start = end - timedelta(days=DAYS)
    clock = ManualClock(start)
    c = build(load_settings(DATABASE_URL=url, SECRET_KEY=SECRET, MAIL_OUTBOX_DIR=str(mail_dir),
                            PUBLIC_BASE_URL="http://127.0.0.1:8000"), clock=clock)
    try:
        rng = random.Random(seed)
        accounts = [account(f"acct-{i:04d}", f"customer{i}@example.com") for i in range(160)]
        load_accounts(c, accounts)
        sim = Simulation(c, rng, accounts)
        for day in range(DAYS):
            for _ in range(rng.randint(3, 9)):
                sim.at(start + timedelta(days=day, hours=rng.uniform(7, 22)), sim.open)
        # the last hours: a few customers still waiting for approvers
        for hours in (5.0, 2.5, 0.7):
            sim.at(end - timedelta(hours=hours), sim.open)
        sim.run(until=end - timedelta(minutes=1))
    finally:
        c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the console staff notices would fill the terminal
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/dashboard.db"
        dbmod.upgrade(url)
        simulate(url, Path(tmp) / "mail", args.seed, datetime.now(timezone.utc))
        # one pass of a worker on the real clock: a worker is alive as the report is drawn
        live = build(load_settings(DATABASE_URL=url, SECRET_KEY=SECRET, MAIL_OUTBOX_DIR=str(Path(tmp) / "mail")))
        live.worker.run_once()
        live.close()
        svg = Path(tmp) / "dashboard.svg"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "INTERCOM_", "SMTP_"))}
        env |= {"DATABASE_URL": url, "SECRET_KEY": SECRET, "BRAND_NAME": "Recovery Bot"}
        bin_dir = Path(sys.executable).parent
        subprocess.run([str(bin_dir / "recoverybot"), "report", "--days", str(DAYS), "--svg", str(svg)],
                       env=env, check=True)
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", "--window-size=1200,860", f"--screenshot={args.out.resolve()}",
                        svg.as_uri()], check=True, capture_output=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
