#!/usr/bin/env python
"""Does the chat's reply to an email address arrive later when the address has an account?

    .venv/bin/pip install -e '.[bench]'                  # scipy, for the Mann-Whitney U test
    .venv/bin/python benchmarks/enumeration_timing.py    # SMTP (slow server) and folder mailer, ~1 minute
    options: --samples N (per group, default 50)  --smtp-delay S (default 0.2)  --mailer smtp|folder|both
             --poll-interval S  --seed N  --json FILE

For each mailer it starts the product itself, `recoverybot serve`, in a scratch folder (SQLite, accounts
imported with `recoverybot accounts import`), with SMTP_URL pointing at a real SMTP server (aiosmtpd) run
in a process of its own that waits --smtp-delay seconds per message, like a slow relay; or with no
SMTP_URL (the folder mailer). Then, one customer at a time, in a shuffled order of N registered and N unknown addresses, a new
chat session says "I lost my authenticator", waits for the bot to ask for an email, and posts the
address; the sample is the time from that POST to the bot's reply being visible through the chat API
(polled every --poll-interval). Every registered address belongs to its own account, so each start is a
real one that emails a code and a notice.

It prints each group's median and the ratio registered/unknown, and a two-sided Mann-Whitney U test: a p
above 0.05 means the two groups' reply times cannot be told apart. Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SECRET = "bench-secret-key-0123456789-abcdefghijklmnop"
# A hundred starts from one address in a minute is the point here, not an attack: lift the per-address limit.
POLICY = json.dumps({"case_starts_per_ip_per_hour": 10_000, "attempts_per_ip_per_hour": 10_000})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_smtp(port: int, delay: float, received) -> None:
    """The SMTP server's own process: kept apart from the client measuring reply times, so its work
    (parsing each message) never competes with the measurement, as a real mail relay would not."""
    import asyncio

    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            await asyncio.sleep(delay)
            with received.get_lock():
                received.value += 1
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    while True:
        time.sleep(3600)


class SlowSmtp:
    """A real SMTP server (aiosmtpd, in a process of its own) that takes `delay` seconds per message."""

    def __init__(self, delay: float):
        import multiprocessing

        self.port = free_port()
        self._received = multiprocessing.Value("i", 0)
        self.process = multiprocessing.Process(target=_serve_smtp, args=(self.port, delay, self._received),
                                               daemon=True)
        self.process.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the SMTP server did not start")

    @property
    def received(self) -> int:
        return self._received.value

    def stop(self):
        self.process.terminate()
        self.process.join(5)


def recoverybot(*args: str, env: dict, cwd: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("recoverybot")
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, check=True)


def start_server(folder: str, env: dict, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("recoverybot")
    proc = subprocess.Popen([str(exe), "serve", "--no-demo"], env=env, cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("recoverybot serve did not come up within 60 s")


def wait_reply(base: str, session_id: str, after: int, poll: float, timeout: float = 30.0) -> tuple[float, int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = requests.get(f"{base}/chat/api/sessions/{session_id}/messages", params={"after": after},
                                timeout=10).json()["messages"]
        bot = [m for m in messages if m["sender"] == "bot"]
        if bot:
            return time.perf_counter(), bot[-1]["seq"], bot[-1]["text"]
        if messages:
            after = messages[-1]["seq"]
        time.sleep(poll)
    raise SystemExit(f"no reply within {timeout} s")


def one_start(base: str, address: str, poll: float) -> tuple[float, str]:
    created = requests.post(f"{base}/chat/api/sessions", json={"locale": "en"}, timeout=10).json()
    sid, after = created["session_id"], created["messages"][-1]["seq"]
    requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": "I lost my authenticator"}, timeout=10)
    _, after, _ = wait_reply(base, sid, after, poll)
    sent = time.perf_counter()
    requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": address}, timeout=10)
    seen, _, text = wait_reply(base, sid, after, poll)
    return (seen - sent) * 1000, text


def run(mailer: str, args) -> dict:
    from scipy.stats import mannwhitneyu

    folder = tempfile.mkdtemp(prefix=f"rb-timing-{mailer}-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "SLACK_", "INTERCOM_"))}
    env.update(DATABASE_URL=f"sqlite:///{folder}/bot.db", SECRET_KEY=SECRET, PORT=str(port), HOST="127.0.0.1",
               RISK_POLICY=POLICY, LOG_LEVEL="WARNING", MAIL_OUTBOX_DIR=f"{folder}/mail")
    smtp = SlowSmtp(args.smtp_delay) if mailer == "smtp" else None
    if smtp:
        env["SMTP_URL"] = f"smtp://127.0.0.1:{smtp.port}"
    known = [f"bench{i}@example.com" for i in range(args.samples)]
    accounts = {"accounts": [{"id": f"acct-bench-{i}", "email": a, "locale": "en",
                              "created_at": "2023-05-02T08:00:00Z", "totp_enabled": True,
                              "facts": {"first_deposit_month": "2023-05"}} for i, a in enumerate(known)]}
    Path(folder, "accounts.json").write_text(json.dumps(accounts))
    recoverybot("db", "upgrade", env=env, cwd=folder)
    recoverybot("accounts", "import", "accounts.json", env=env, cwd=folder)
    proc = start_server(folder, env, port)
    base = f"http://127.0.0.1:{port}"
    letters = random.Random(args.seed)
    unknown = [f"nobody.{''.join(letters.choices('abcdefghijklmnopqrstuvwxyz', k=8))}@example.com"
               for _ in range(args.samples)]
    order = [("registered", a) for a in known] + [("unknown", a) for a in unknown]
    random.Random(args.seed).shuffle(order)
    samples: dict[str, list[float]] = {"registered": [], "unknown": []}
    texts: dict[str, set[str]] = {"registered": set(), "unknown": set()}  # every reply text seen
    try:
        one_start(base, "warmup@example.com", args.poll_interval)
        for group, address in order:
            ms, text = one_start(base, address, args.poll_interval)
            samples[group].append(ms)
            texts[group].add(text)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if smtp:
            smtp.stop()
    test = mannwhitneyu(samples["registered"], samples["unknown"], alternative="two-sided")
    med = {g: statistics.median(v) for g, v in samples.items()}
    return {"mailer": mailer, "smtp_delay_s": args.smtp_delay if smtp else None, "n": args.samples,
            "median_ms": med, "p90_ms": {g: sorted(v)[int(0.9 * len(v)) - 1] for g, v in samples.items()},
            "ratio_registered_to_unknown": med["registered"] / med["unknown"],
            "mann_whitney_u": float(test.statistic), "p_value": float(test.pvalue),
            "same_text": texts["registered"] == texts["unknown"] and len(texts["registered"]) == 1,
            "texts": {g: sorted(t) for g, t in texts.items()},
            "emails_accepted_by_smtp_during_run": smtp.received if smtp else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--smtp-delay", type=float, default=0.2)
    parser.add_argument("--mailer", choices=["smtp", "folder", "both"], default="both")
    parser.add_argument("--poll-interval", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--json", help="write the results to this file as well")
    args = parser.parse_args()
    results = [run(m, args) for m in (["smtp", "folder"] if args.mailer == "both" else [args.mailer])]
    print(f"{'mailer':8} {'n':>4} {'registered p50':>15} {'unknown p50':>12} {'ratio':>6} {'U':>8} {'p':>6}  same text")
    for r in results:
        print(f"{r['mailer']:8} {r['n']:>4} {r['median_ms']['registered']:>12.1f} ms {r['median_ms']['unknown']:>9.1f} ms "
              f"{r['ratio_registered_to_unknown']:>6.3f} {r['mann_whitney_u']:>8.0f} {r['p_value']:>6.3f}  {r['same_text']}")
    for r in results:
        verdict = "cannot be told apart" if r["p_value"] > 0.05 else "DIFFER"
        print(f"{r['mailer']}: reply times for registered and unknown addresses {verdict} (p = {r['p_value']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
