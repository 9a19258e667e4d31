"""The customer's pages in a real headless Chromium: the web chat at /chat, the enroll and cancel pages
and the error pages, each checked for Content-Security-Policy violations as it is used.

Chromium is Debian's package at /usr/bin/chromium, driven through Playwright's sync API with flags that
keep it from calling out; Playwright's own browser download is never used (.ci/run installs Chromium).
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

from tests.conftest import ChatClient, code_in, link_in
from tests.helpers import load_demo

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"  # alex@example.com's demo password
WAIT_MS = 10_000


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


@pytest.fixture
def page(browser):
    """A fresh page; the test fails if any page it opened broke the Content-Security-Policy."""
    context = browser.new_context(viewport={"width": 900, "height": 900}, locale="en-US")
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
    bubble = page.locator(".msg.bot span", has_text=text)
    bubble.first.wait_for(state="visible")
    return bubble.first


def _type(page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send")


def test_chat_page_takes_a_customer_to_awaiting_approval(sqlite_url, live, smtp, page, tmp_path):
    """A customer clicks the quick button, types email, emailed code and two facts, and is told the
    security team has the request, which is then awaiting approval in the database."""
    smtp_url, mailbox = smtp
    server = live(sqlite_url, SMTP_URL=smtp_url)
    c = server.container
    load_demo(c)
    _only_local(page, server.url)

    page.goto(f"{server.url}/chat")
    assert page.title().startswith("Support chat")
    _bot_says(page, "2FA assistant")
    page.get_by_role("button", name="I lost my authenticator").click()
    _bot_says(page, "What is the email address registered")
    # the quick button's text is posted like a typed message and shown as the customer's bubble
    assert page.locator(".msg.customer span", has_text="I lost my authenticator").count() == 1

    _type(page, "alex@example.com")
    _bot_says(page, "6-digit verification code")
    code = code_in(mailbox.wait_for("verification_code", to="alex@example.com"))
    _type(page, code)
    _bot_says(page, "first deposit")
    _type(page, "May 2023")
    _bot_says(page, "currency")
    _type(page, "USDT")
    done = _bot_says(page, "security team").inner_text()

    case_id = re.search(r"RC-[A-Z0-9]{8}", done).group(0)
    with c.recovery.service() as svc:
        case = svc.get(case_id)
        assert case.state == "awaiting_approval"
        assert case.account_id == "acct-1001"
        assert {chk.name: chk.result for chk in svc.checks(case)}["email_code"] == "pass"
    # the emailed code is never echoed back into the transcript the page shows
    transcript = page.inner_text("#messages")
    assert code not in transcript and "••••••" in transcript
    assert page.input_value("#text") == ""

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


def test_enroll_page_binds_a_new_authenticator(sqlite_url, live, smtp, page, tmp_path):
    """After a local approval the emailed link asks for the password, shows an inline SVG QR and a setup
    key, refuses a wrong code, accepts the app's code, shows 8 recovery codes, and then is dead."""
    smtp_url, mailbox = smtp
    server = live(sqlite_url, SMTP_URL=smtp_url)
    c = server.container
    load_demo(c)
    case_id = _awaiting_approval_over_http(server, mailbox)
    c.recovery.decide(case_id, approver="alice", decision="approve", channel="cli")
    link = link_in(mailbox.wait_for("enroll_link", to="alex@example.com"), "enroll")
    _only_local(page, server.url)

    first = page.goto(link)
    assert first.status == 200
    assert first.headers["cache-control"] == "no-store"
    assert page.locator("input[type=password]#password").is_visible()
    page.fill("#password", PASSWORD)
    page.click("#continue")

    page.locator("#setup-key").wait_for()
    assert page.locator("#qr > svg").count() == 1, "the QR code must be an inline SVG"
    assert page.locator("img").count() == 0
    assert page.locator("#qr > svg").bounding_box()["width"] >= 150
    shot = tmp_path / "enroll_setup.png"
    page.screenshot(path=str(shot), full_page=True)
    assert _png_size(shot)[0] >= 600
    secret = page.inner_text("#setup-key").replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), secret

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
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "completed"

    again = page.goto(link)
    assert again.status == 410
    assert "already used" in page.inner_text("#reason")
    assert page.locator("#setup-key").count() == 0 and page.locator("#recovery-codes").count() == 0
    assert page.outside_requests == []


def test_enroll_page_refuses_an_unknown_link(sqlite_url, live, page):
    """A link that was never issued shows the link error page, not a form."""
    server = live(sqlite_url, worker=False)
    response = page.goto(f"{server.url}/enroll/{'A' * 43}")
    assert response.status == 404
    assert "recognise this link" in page.inner_text("#reason")
    assert page.locator("form").count() == 0


def _csp(response) -> dict[str, str]:
    directives = (d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def test_cancel_and_error_pages_run_under_a_strict_policy(sqlite_url, live, page):
    """The cancel page, its confirmation, a link error and a 404 all carry a CSP that allows no inline
    script except by hash and forbids framing, and none of them breaks it."""
    from tests.helpers import last_mail, load_demo, open_case

    server = live(sqlite_url)
    c = server.container
    load_demo(c)
    case_id = open_case(c, "alex@example.com")
    cancel = link_in(last_mail(c, "reset_requested", case_id), "cancel")
    first = page.goto(cancel)
    policy = _csp(first)
    assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
    assert "unsafe-inline" not in first.headers["content-security-policy"]
    assert all(src.startswith("'sha256-") for src in policy["script-src"].split())
    assert first.headers["cache-control"] == "no-store" and first.headers["referrer-policy"] == "no-referrer"
    with page.expect_navigation() as nav:
        page.locator("form button").first.click()
    assert nav.value.status == 200 and "content-security-policy" in nav.value.headers
    with c.recovery.service() as svc:
        assert svc.get(case_id).state == "cancelled"
    assert page.goto(f"{server.url}/enroll/{'B' * 43}").status == 404
    missing = page.goto(f"{server.url}/no-such-page")
    assert missing.status == 404 and _csp(missing)["frame-ancestors"] == "'none'"


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
