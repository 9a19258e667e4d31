"""The customer's pages in a real headless Chromium: the web chat at /chat, the enroll and cancel pages
and the error pages, each checked for Content-Security-Policy violations as it is used, and checked by
axe-core for accessibility (0 serious or critical violations) at desktop and phone widths, in both languages.

Chromium is Debian's package at /usr/bin/chromium, driven through Playwright's sync API with flags that
keep it from calling out; Playwright's own browser download is never used (.ci/run installs Chromium).
axe-core is the npm package pinned by package-lock.json (.ci/run runs `npm ci`); it is evaluated in the
page through the DevTools protocol, which the page's own Content-Security-Policy does not govern.
"""
from __future__ import annotations

import os
import re
import struct
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyotp
import pytest
import requests
from sqlalchemy import select

from tests.conftest import ChatClient, code_in, link_in
from recovery.models import Case
from tests.helpers import load_demo

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"  # alex@example.com's demo password
WAIT_MS = 10_000
AXE = Path(__file__).parent.parent / "node_modules" / "axe-core" / "axe.min.js"
DESKTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}


def _missing(reason: str):
    """In CI the browser must be there (.ci/run installs it); elsewhere say loudly why we skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (apt-get install -y chromium)")
    pytest.skip(f"BROWSER TESTS SKIPPED: {reason} (install Debian's chromium package to run them)")


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        _missing(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _missing(f"the playwright package is not installed: {exc}")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# Reports each CSP violation to the test through a binding (bindings and init scripts are added by the
# browser itself, so the page's own policy does not stop them).
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", function (e) {
  window.cspViolation(e.violatedDirective + " blocked " + (e.blockedURI || "inline") + " on " + e.documentURI);
});
"""


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.exists():
        _missing(f"{AXE} is missing (run `npm ci` in the repository)")
    return AXE.read_text()


def axe(page, source: str, where: str) -> int:
    """Run axe-core on the page as it stands; fail on any serious or critical violation. Returns how
    many rules axe checked, so a caller can see it really ran."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(source)
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ["violations", "passes"]});
        return {checked: r.passes.length + r.violations.length,
                bad: r.violations.filter(v => v.impact === "serious" || v.impact === "critical")
                      .map(v => v.id + " (" + v.impact + "): " + v.nodes.map(n => n.target.join(" ")).join(", "))};
    }""")
    assert result["bad"] == [], f"axe on {where}: {result['bad']}"
    assert result["checked"] > 10, where
    return result["checked"]


def axe_both_widths(page, source: str, where: str) -> None:
    """axe at the current width, then at the other one (desktop or phone), leaving the page at desktop."""
    for size in (PHONE, DESKTOP):
        page.set_viewport_size(size)
        axe(page, source, f"{where} at {size['width']} px")


@pytest.fixture
def page(browser):
    """A fresh page; the test fails if any page it opened broke the Content-Security-Policy."""
    context = browser.new_context(viewport=DESKTOP, locale="en-US", accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    violations: list[str] = []
    context.expose_function("cspViolation", lambda text: violations.append(text))
    context.add_init_script(REPORT_VIOLATIONS)
    pg = context.new_page()
    pg.outside_requests = []  # anything the page fetches from a host other than our server
    pg.csp_violations = violations
    yield pg
    pg.wait_for_timeout(100)  # let a late report arrive
    context.close()
    assert violations == [], f"Content-Security-Policy violations: {violations}"


def _only_local(page, base_url: str) -> None:
    origin = urlsplit(base_url).netloc

    def seen(request):
        if request.url.startswith(("http://", "https://")) and urlsplit(request.url).netloc != origin:
            page.outside_requests.append(request.url)
    page.on("request", seen)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _bot_says(page, text: str):
    """Wait until a bot bubble containing `text` is on the page, and return it."""
    bubble = page.locator(".msg.bot .bubble", has_text=text)
    bubble.first.wait_for(state="visible")
    return bubble.first


def _type(page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send")


def test_chat_page_survives_a_reload_and_takes_a_customer_to_awaiting_approval(sqlite_url, live, smtp, page,
                                                                              axe_source, tmp_path):
    """A customer taps the quick button, types their email, reloads the page (and opens a new tab) in the
    middle and finds the same conversation, types the emailed code and two facts, and is told when to
    expect a decision; switching language turns the page's labels and the bot's replies to Chinese. The
    page is accessible (a labelled input, a live log, landmarks) at both widths in both languages."""
    smtp_url, mailbox = smtp
    server = live(sqlite_url, SMTP_URL=smtp_url)
    c = server.container
    load_demo(c)
    _only_local(page, server.url)

    posted = []  # the page's messages: each POST waits for its reply ("wait"), so none needs a poll
    page.on("request", lambda r: posted.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/messages") else None)
    page.goto(f"{server.url}/chat")
    assert page.title().startswith("Support chat")
    _bot_says(page, "2FA assistant")
    assert page.get_by_label("Your message").count() == 1
    assert page.locator("[role=log][aria-live=polite]").count() == 1 and page.locator("main h1 a").count() == 0
    axe_both_widths(page, axe_source, "chat (en)")
    page.get_by_role("button", name="I lost my authenticator").click()
    _bot_says(page, "What is the email address registered")
    # the quick button's text is posted like a typed message and shown as the customer's bubble
    assert page.locator(".msg.customer .bubble", has_text="I lost my authenticator").count() == 1

    _type(page, "alex@example.com")
    _bot_says(page, "6-digit verification code")
    assert page.get_by_role("button", name="Use a different email").is_visible()
    before = page.locator(".msg").count()
    page.reload()  # phones drop tabs while people read their mail
    _bot_says(page, "6-digit verification code")
    assert page.locator(".msg").count() == before and page.locator(".msg.bot", has_text="2FA assistant").count() == 1
    other = page.context.new_page()  # and a new tab carries on too
    other.goto(f"{server.url}/chat")
    other.locator(".msg.bot .bubble", has_text="6-digit verification code").wait_for()
    other.close()

    code = code_in(mailbox.wait_for("verification_code", to="alex@example.com"))
    _type(page, code)
    _bot_says(page, "first deposit")
    _type(page, "May 2023")
    _bot_says(page, "currency")
    _type(page, "USDT")
    done = _bot_says(page, "security team").inner_text()
    assert "A decision usually comes within 2 hours" in done and "withdrawals are paused for 24 hours" in done

    case_id = re.search(r"RC-[A-Z0-9]{8}", done).group(0)
    with c.recovery.service() as svc:
        case = svc.get(case_id)
        assert case.state == "awaiting_approval"
        assert case.account_id == "acct-1001"
        assert {chk.name: chk.result for chk in svc.checks(case)}["email_code"] == "pass"
        assert len(list(svc.s.scalars(select(Case)))) == 1  # the reload started nothing new
    # the emailed code is never echoed back into the transcript the page shows
    transcript = page.inner_text("#messages")
    assert code not in transcript and "••••••" in transcript
    assert page.input_value("#text") == ""
    # what was shown while each POST waited is gone, replaced by the line as stored
    assert page.locator(".msg.pending").count() == 0
    assert len(posted) == 5 and all(body["wait"] == 10 and body["after"] > 0 for body in posted)

    with page.expect_navigation():
        page.click("nav.lang a[data-lang=zh-TW]")
    assert page.locator("h1").inner_text() == "客服聊天" and page.get_by_label("您的訊息").count() == 1
    _bot_says(page, "好的，我會用繁體中文回覆。")
    assert page.locator(".msg .bubble", has_text="security team").count() == 1  # the same conversation
    axe_both_widths(page, axe_source, "chat (zh-TW)")

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    width, height = _png_size(shot)
    assert width >= 600 and height >= 600
    assert page.outside_requests == []


def _awaiting_approval_over_http(server, mailbox) -> str:
    chat = ChatClient(server.url)
    assert "email address" in chat.ask("I lost my authenticator")
    assert "verification code" in chat.ask("alex@example.com")
    assert "first deposit" in chat.ask(code_in(mailbox.wait_for("verification_code", to="alex@example.com")))
    assert "currency" in chat.ask("May 2023")
    return re.search(r"RC-[A-Z0-9]{8}", chat.ask("USDT")).group(0)


def _wrong_code(secret: str) -> str:
    """A six-digit code that matches no step within the drift search, so it reads as plainly wrong."""
    totp = pyotp.TOTP(secret)
    now = time.time()
    near = {totp.at(now + k * 30) for k in range(-12, 13)}
    return next(c for c in (f"{n:06d}" for n in range(0, 1_000_000, 7919)) if c not in near)


def _enroll_link(server, mailbox, account: str = "alex@example.com") -> tuple[str, str]:
    c = server.container
    case_id = _awaiting_approval_over_http(server, mailbox)
    c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
    return case_id, link_in(mailbox.wait_for("enroll_link", to=account), "enroll")


def test_enroll_page_binds_a_new_authenticator(sqlite_url, live, smtp, page, axe_source):
    """After a local approval the emailed link shows step 1 of 3 and asks for the password, then an inline
    SVG QR, a setup key with a copy button, refuses a wrong code, accepts the app's code, and shows 8
    recovery codes with copy, download and print and the next step (the hold's end); then the link is
    dead. Every step passes axe at both widths."""
    smtp_url, mailbox = smtp
    server = live(sqlite_url, SMTP_URL=smtp_url)
    c = server.container
    load_demo(c)
    case_id, link = _enroll_link(server, mailbox)
    _only_local(page, server.url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)

    first = page.goto(link)
    assert first.status == 200
    assert first.headers["cache-control"] == "no-store"
    assert page.locator("[aria-current=step]").inner_text().endswith("Confirm it's you")
    assert page.locator("input[type=password]#password").is_visible()
    axe_both_widths(page, axe_source, "enroll start (en)")
    page.fill("#password", PASSWORD)
    page.click("#continue")

    page.locator("#setup-key").wait_for()
    assert page.locator("[aria-current=step]").inner_text().endswith("Add to your app")
    assert page.locator("#qr > svg").count() == 1, "the QR code must be an inline SVG"
    assert page.locator("img").count() == 0
    assert page.locator("#qr > svg").bounding_box()["width"] >= 150
    assert not page.locator("#otpauth").is_visible()  # the app link is for phones
    secret = page.inner_text("#setup-key").replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), secret
    page.click("#copy-key")
    page.get_by_role("button", name="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()").replace(" ", "") == secret
    axe_both_widths(page, axe_source, "enroll setup (en)")

    page.fill("#code", _wrong_code(secret))
    with page.expect_navigation() as nav:
        page.click("#confirm")
    assert nav.value.status == 400
    assert "not right" in page.inner_text("#error")
    # the same secret is shown again, so the app the customer already scanned still works
    assert page.inner_text("#setup-key").replace(" ", "") == secret

    page.fill("#code", pyotp.TOTP(secret).now())
    with page.expect_navigation() as nav:
        page.click("#confirm")
    assert nav.value.status == 200
    codes = page.locator("#recovery-codes li").all_inner_texts()
    assert len(codes) == 8 and len(set(codes)) == 8
    assert all(re.fullmatch(r"[0-9a-f]{5}(-[0-9a-f]{5}){3}", code) for code in codes), codes
    assert page.locator("[aria-current=step]").inner_text().endswith("Save recovery codes")
    assert "withdrawals stay paused until" in page.inner_text("#next")
    with page.expect_download() as download:
        page.click("#download-codes")
    saved = Path(download.value.path()).read_text()
    assert all(code in saved for code in codes) and "Each works once" in saved
    page.click("#copy-codes")
    assert page.evaluate("navigator.clipboard.readText()").split() == codes
    axe_both_widths(page, axe_source, "enroll done (en)")
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "completed"

    again = page.goto(link)
    assert again.status == 410
    assert "already used" in page.inner_text("#reason")
    assert page.locator("#setup-key").count() == 0 and page.locator("#recovery-codes").count() == 0
    assert page.get_by_role("link", name="Back to the support chat").count() == 1
    assert page.outside_requests == []


def test_enroll_pages_on_a_phone_in_chinese(sqlite_url, live, smtp, browser, axe_source):
    """On a phone, in Traditional Chinese: the setup page offers an otpauth:// link that opens the
    authenticator app, the recovery codes never wrap mid-code, and every step passes axe at both widths."""
    smtp_url, mailbox = smtp
    server = live(sqlite_url, SMTP_URL=smtp_url)
    load_demo(server.container)
    _, link = _enroll_link(server, mailbox)
    context = browser.new_context(viewport=PHONE, locale="zh-TW", is_mobile=True, has_touch=True)
    context.set_default_timeout(WAIT_MS)
    violations: list[str] = []
    context.expose_function("cspViolation", lambda text: violations.append(text))
    context.add_init_script(REPORT_VIOLATIONS)
    page = context.new_page()

    page.goto(f"{link}?lang=zh-TW")
    assert page.locator("[aria-current=step]").inner_text().endswith("確認是您本人")
    axe_both_widths(page, axe_source, "enroll start (zh-TW)")
    page.set_viewport_size(PHONE)
    page.fill("#password", PASSWORD)
    page.click("#continue")
    page.locator("#setup-key").wait_for()
    app_link = page.locator("#otpauth")
    assert app_link.is_visible() and app_link.inner_text() == "在我的驗證器 App 中開啟"
    assert app_link.get_attribute("href").startswith("otpauth://totp/")
    secret = page.inner_text("#setup-key").replace(" ", "")
    assert f"secret={secret}" in app_link.get_attribute("href")
    axe_both_widths(page, axe_source, "enroll setup (zh-TW)")
    page.set_viewport_size(PHONE)
    page.fill("#code", pyotp.TOTP(secret).now())
    with page.expect_navigation():
        page.click("#confirm")
    rows = page.locator("#recovery-codes li")
    heights = {round(rows.nth(i).bounding_box()["height"]) for i in range(rows.count())}
    line = page.evaluate("parseFloat(getComputedStyle(document.querySelector('#recovery-codes li')).lineHeight)")
    assert rows.count() == 8 and max(heights) < 1.5 * line, (heights, line)  # one line each: no wrapping
    assert page.get_by_role("button", name="列印").is_visible()
    axe_both_widths(page, axe_source, "enroll done (zh-TW)")
    page.wait_for_timeout(100)
    context.close()
    assert violations == [], violations


def _csp(response) -> dict[str, str]:
    directives = (d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def test_cancel_and_error_pages_run_under_a_strict_policy(sqlite_url, live, page, axe_source):
    """The cancel page (in both languages, both widths), its confirmation, a link error and a 404 all carry
    a CSP that allows no inline script except by hash and forbids framing, none of them breaks it, each
    passes axe, and the error pages speak the reader's language and lead back to the chat."""
    from tests.helpers import last_mail, load_demo, open_case

    server = live(sqlite_url)
    c = server.container
    load_demo(c)
    case_id = open_case(c, "alex@example.com")
    cancel = link_in(last_mail(c, "reset_requested", case_id), "cancel")
    page.goto(f"{cancel}?lang=zh-TW")
    assert page.locator("h1").inner_text() == "取消兩步驟驗證找回"
    axe_both_widths(page, axe_source, "cancel (zh-TW)")
    first = page.goto(cancel)
    policy = _csp(first)
    assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
    assert "unsafe-inline" not in first.headers["content-security-policy"]
    assert all(src.startswith("'sha256-") for src in policy["script-src"].split())
    assert first.headers["cache-control"] == "no-store" and first.headers["referrer-policy"] == "no-referrer"
    axe_both_widths(page, axe_source, "cancel (en)")
    with page.expect_navigation() as nav:
        page.locator("form button").first.click()
    assert nav.value.status == 200 and "content-security-policy" in nav.value.headers
    assert "is cancelled" in page.inner_text("#result")
    axe(page, axe_source, "cancel done (en)")
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "cancelled"

    unknown = page.goto(f"{server.url}/enroll/{'A' * 43}")
    assert unknown.status == 404 and "recognise this link" in page.inner_text("#reason")
    assert page.locator("form").count() == 0
    axe(page, axe_source, "link error (en)")
    missing = page.goto(f"{server.url}/no-such-page")
    assert missing.status == 404 and _csp(missing)["frame-ancestors"] == "'none'"
    assert page.get_by_role("link", name="Back to the support chat").count() == 1
    page.goto(f"{server.url}/no-such-page?lang=zh-TW")
    assert page.locator("h1").inner_text().startswith("發生錯誤") and page.locator("#back").inner_text() == "回到客服聊天"
    by_header = requests.get(f"{server.url}/no-such-page", headers={"Accept-Language": "zh-TW,zh;q=0.9"}, timeout=10)
    assert by_header.status_code == 404 and "回到客服聊天" in by_header.text
    axe(page, axe_source, "404 (zh-TW)")


def test_a_page_without_its_script_hash_is_reported(sqlite_url, live, browser):
    """The violation check can fail: served with its script hash removed from the policy, the chat page's
    script is blocked and the violation reaches the test."""
    server = live(sqlite_url, worker=False)
    context = browser.new_context()
    violations: list[str] = []
    context.expose_function("cspViolation", lambda text: violations.append(text))
    context.add_init_script(REPORT_VIOLATIONS)
    pg = context.new_page()

    def without_script_hash(route):
        response = route.fetch()
        headers = dict(response.headers)
        headers["content-security-policy"] = re.sub(r"script-src [^;]+", "script-src 'self'",
                                                    headers["content-security-policy"])
        route.fulfill(response=response, headers=headers)

    pg.route(f"{server.url}/chat", without_script_hash)
    pg.goto(f"{server.url}/chat")
    pg.wait_for_timeout(300)
    context.close()
    assert any(v.startswith("script-src") and "inline" in v for v in violations), violations
