"""Render the customer-facing screenshots in docs/screenshots/: the web chat (desktop, English, and a
phone in Traditional Chinese), the three enroll steps, and one email, from a real recovery.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

The real app and worker run on 127.0.0.1 (benchmarks/customer_effort.py: running_app), headless
Chromium (/usr/bin/chromium, through Playwright; no browser download) plays the customer, and the email
is the HTML part the mailer wrote for the re-enrollment link, shown in the same browser. Chinese text
needs a CJK font (Debian: `apt-get install fonts-wqy-microhei`).
"""
from __future__ import annotations

import argparse
import email
import re
import sys
import tempfile
from email.policy import default as default_policy
from pathlib import Path

import pyotp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.customer_effort import PASSWORD, running_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
DESKTOP, PHONE = {"width": 1100, "height": 900}, {"width": 390, "height": 844}


def newest_mail(folder: Path, template: str, timeout_s: float = 15):
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(folder.glob(f"*-{template}.eml"))
        if found:
            return email.message_from_bytes(found[-1].read_bytes(), policy=default_policy)
        time.sleep(0.05)
    raise RuntimeError(f"no {template} email")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, running_app(tmp, BRAND_NAME="Exchange") as (c, base), \
            sync_playwright() as p:
        mail = Path(tmp) / "mail"
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport=DESKTOP, locale="en-US")
        page.set_default_timeout(15_000)

        def bot_says(text: str) -> None:
            page.locator(".msg.bot .bubble", has_text=text).first.wait_for()

        def say(text: str) -> None:
            page.fill("#text", text)
            page.click("#send")

        page.goto(f"{base}/chat")
        bot_says("2FA assistant")
        page.get_by_role("button", name="I lost my authenticator").click()
        bot_says("email address registered")
        say("alex@example.com")
        bot_says("6-digit verification code")
        code = re.search(r"\b(\d{6})\b", newest_mail(mail, "verification_code").get_body(("plain",)).get_content())
        say(code.group(1))
        bot_says("first deposit")
        say("May 2023")
        bot_says("currency")
        say("USDT")
        bot_says("security team")
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / "chat.png"))
        case_id = re.search(r"RC-[A-Z0-9]{8}", page.inner_text("#messages")).group(0)

        phone = browser.new_page(viewport=PHONE, locale="zh-TW", is_mobile=True)
        phone.goto(f"{base}/chat?lang=zh-TW")
        phone.locator(".msg.bot .bubble").first.wait_for()
        phone.get_by_role("button", name="我遺失了驗證器").click()
        phone.locator(".msg.bot .bubble", has_text="電子郵件").first.wait_for()
        phone.wait_for_timeout(300)
        phone.screenshot(path=str(out / "chat-phone-zh-TW.png"))

        c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
        link_mail = newest_mail(mail, "enroll_link")
        link = re.search(r"https?://\S+/enroll/[A-Za-z0-9_\-]+", link_mail.get_body(("plain",)).get_content()).group(0)
        page.goto(link)
        page.screenshot(path=str(out / "enroll-1-start.png"), full_page=True)
        page.fill("#password", PASSWORD)
        page.click("#continue")
        page.locator("#setup-key").wait_for()
        page.screenshot(path=str(out / "enroll-2-setup.png"), full_page=True)
        secret = page.inner_text("#setup-key").replace(" ", "")
        page.fill("#code", pyotp.TOTP(secret).now())
        with page.expect_navigation():
            page.click("#confirm")
        page.screenshot(path=str(out / "enroll-3-codes.png"), full_page=True)

        page.goto("about:blank")  # out of our pages, whose Content-Security-Policy forbids inline styles
        page.set_content(link_mail.get_body(("html",)).get_content())
        page.screenshot(path=str(out / "email-enroll-link.png"), full_page=True)
        browser.close()
    for png in sorted(out.glob("*.png")):
        print(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
