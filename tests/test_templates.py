"""Every customer-facing text exists in English and Traditional Chinese and renders."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.templates import BUILTIN, LOCALES, Renderer

ROOT = Path(__file__).parent.parent
CTX = dict(code="123456", minutes=10, case_id="RC-TEST0001", cancel_url="http://x/cancel/t", link="http://x/enroll/t",
           notice_hours=24, hold_hours=48, reason="<b>because</b>", decoy=False, remaining=2, state="verifying",
           fact="first_deposit_month", first=True, drift=90, outcome="cancelled", status=500, title="x",
           requested_at="2026-12-02T01:00:00+00:00", request_channel="webchat", by_staff=False,
           resets_at="2026-12-20T01:00:00+00:00", max_cases=3, open_case_id="RC-OPEN0001",
           hold_until="2026-12-03T01:00:00+00:00", lock_url="http://x/lock/t", lock_hold_hours=168)


@pytest.fixture
def renderer():
    return Renderer(globals={"brand_name": "ACME", "support_email": "help@acme.test"})


def _blocks(path: Path) -> set[str]:
    return set(re.findall(r"{% block (\w+) %}", path.read_text()))


@pytest.mark.parametrize("kind", ["chat", "web"])
def test_both_languages_have_the_same_messages(kind):
    """The zh-TW file defines exactly the blocks the English one does."""
    assert _blocks(BUILTIN / kind / "en.j2") == _blocks(BUILTIN / kind / "zh-TW.j2")


def test_every_chat_key_the_code_uses_exists(renderer):
    """Each message key the domain emits has a template in both languages."""
    source = "".join(p.read_text() for p in (ROOT / "recovery").rglob("*.py"))
    keys = set(re.findall(r'say\(conv, "(\w+)"', source))
    keys |= set(re.findall(r'notify\.chat\([^,]+, [^,]+, "(\w+)"', source))
    keys |= {f"case_{o}" for o in re.findall(r'_closed\(case, "(\w+)"\)', source)}
    assert {"menu", "code_sent", "case_locked", "link_sent"} <= keys
    for locale in LOCALES:
        for key in keys:
            assert renderer.chat(key, locale, CTX), (key, locale)


@pytest.mark.parametrize("locale", LOCALES)
def test_every_email_renders_with_text_and_html(renderer, locale):
    """Each named email has a subject, a text part and an HTML part, and escapes values in HTML."""
    names = [p.name.removesuffix(".j2") for p in (BUILTIN / "email" / "en").iterdir()
             if p.name.endswith(".j2") and not p.name.startswith("_")]
    assert len(names) >= 10
    for name in names:
        subject, text, html = renderer.email(name, locale, CTX)
        assert subject and text.strip() and "<html" in html, name
        assert "<b>because</b>" not in html


def test_operator_folder_shadows_builtin(tmp_path):
    """A TEMPLATES_DIR file replaces the built-in one of the same name."""
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "en.j2").write_text((BUILTIN / "chat" / "en.j2").read_text().replace(
        "{% block rate_limited %}", "{% block rate_limited %}SLOW DOWN. "))
    r = Renderer(override_dir=str(tmp_path), globals={"brand_name": "B", "support_email": "s@b"})
    assert r.chat("rate_limited", "en").startswith("SLOW DOWN.")
    assert not r.chat("rate_limited", "zh-TW").startswith("SLOW DOWN.")
