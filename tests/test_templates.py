"""Every customer-facing text is one template, translated through a gettext catalog per language, and every
catalog is complete: a missing or untranslated string fails here, so adding a language is adding a catalog."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

from bot.templates import BUILTIN, LOCALES, Renderer, catalog_locales

ROOT = Path(__file__).parent.parent
CTX = dict(code="123456", minutes=10, case_id="RC-TEST0001", cancel_url="http://x/cancel/t", link="http://x/enroll/t",
           notice_hours=24, hold_hours=48, reason="<b>because</b>", decoy=False, remaining=2, state="verifying",
           fact="first_deposit_month", first=True, drift=90, outcome="cancelled", status=500, title="x",
           requested_at="2026-12-02T01:00:00+00:00", request_channel="webchat", by_staff=False,
           resets_at="2026-12-20T01:00:00+00:00", max_cases=3, open_case_id="RC-OPEN0001",
           hold_until="2026-12-03T01:00:00+00:00", lock_url="http://x/lock/t", lock_hold_hours=168,
           review_hours=2, due="2026-12-03T01:00:00+00:00", limit=3, kinds=["password"])
EMAILS = sorted(p.name.removesuffix(".j2") for p in (BUILTIN / "email").iterdir()
                if p.name.endswith(".j2") and not p.name.startswith("_"))


@pytest.fixture(scope="module")
def renderer():
    return Renderer(globals={"brand_name": "ACME", "support_email": "help@acme.test"})


def extracted() -> dict[str, tuple[str, ...]]:
    """Every translatable string in the templates, as `pybabel extract -F babel.cfg` finds it."""
    with (ROOT / "babel.cfg").open() as f:
        method_map, options_map = parse_mapping_cfg(f)
    found = {}
    for _, _, message, _, _ in extract_from_dir(str(BUILTIN), method_map, options_map):
        ids = (message,) if isinstance(message, str) else tuple(message)
        found[ids[0]] = ids
    return found


def test_there_is_one_template_per_message():
    """No template exists once per language any more: chat, page texts and emails are single files."""
    per_language = [p for p in Path(str(BUILTIN)).rglob("*") if re.fullmatch(r"(en|zh-TW)(\.j2)?", p.name)]
    assert per_language == []
    assert (BUILTIN / "chat" / "messages.j2").is_file() and len(EMAILS) >= 12


def test_locales_are_english_plus_each_catalog():
    """The offered languages are the source language and one per catalog found."""
    assert LOCALES == ("en", *catalog_locales(BUILTIN)) and "zh-TW" in LOCALES


@pytest.mark.parametrize("locale", [loc for loc in LOCALES if loc != "en"])
def test_every_catalog_translates_every_string(locale):
    """Each catalog has every extracted string, translated (not empty, not fuzzy, every plural form), with
    the same placeholders as the English."""
    path = Path(str(BUILTIN)) / "locale" / locale.replace("-", "_") / "LC_MESSAGES" / "messages.po"
    with path.open("rb") as f:
        catalog = read_po(f)
    problems = []
    for msgid, ids in extracted().items():
        entry = catalog.get(msgid)
        strings = () if entry is None else (entry.string if isinstance(entry.string, tuple) else (entry.string,))
        if entry is None:
            problems.append(f"missing: {msgid!r}")
        elif entry.fuzzy or not all(strings):
            problems.append(f"untranslated: {msgid!r}")
        elif any(set(re.findall(r"%\(\w+\)s", s)) - set(re.findall(r"%\(\w+\)s", " ".join(ids))) for s in strings):
            problems.append(f"placeholder not in the English: {msgid!r}")
    assert problems == [], "\n".join(problems)


def test_the_catalog_check_can_fail(tmp_path):
    """A catalog that lacks a string the templates use is caught (the check above is not vacuous)."""
    ids = extracted()
    assert "Start over" in ids and len(ids) > 200
    with (Path(str(BUILTIN)) / "locale" / "zh_TW" / "LC_MESSAGES" / "messages.po").open("rb") as f:
        catalog = read_po(f)
    catalog.delete("Start over")
    assert catalog.get("Start over") is None and "Start over" in ids


def test_every_chat_key_the_code_uses_exists(renderer):
    """Each message key the domain emits renders in every language, and not in English outside English."""
    source = "".join(p.read_text() for p in (ROOT / "recovery").rglob("*.py"))
    keys = set(re.findall(r'say\(conv, "(\w+)"', source))
    keys |= set(re.findall(r'notify\.chat\([^,]+, [^,]+, "(\w+)"', source))
    keys |= {f"case_{o}" for o in re.findall(r'_closed\(case, "(\w+)"\)', source)}
    assert {"menu", "code_sent", "case_locked", "link_sent", "dispute", "thanks"} <= keys
    for locale in LOCALES:
        for key in keys:
            text = renderer.chat(key, locale, CTX)
            assert text, (key, locale)
            if locale == "zh-TW" and not key.startswith("staff_"):
                assert re.search(r"[\u3400-\u9fff]", text), (key, text)


@pytest.mark.parametrize("locale", LOCALES)
def test_every_email_renders_with_text_and_html(renderer, locale):
    """Each named email has a subject, a text part and an HTML part, and escapes values in HTML."""
    for name in EMAILS:
        subject, text, html = renderer.email(name, locale, CTX)
        assert subject and text.strip() and "<html" in html, name
        assert "<b>because</b>" not in html
        if locale == "zh-TW":  # nothing left in English but values
            assert not re.search(r"\b(the|your|request|cancel)\b", re.sub(r"https?://\S+", "", text), re.I), \
                (name, text)


def test_an_email_keeps_its_paragraphs(renderer):
    """Plain-text emails keep their blank lines between paragraphs (no template tag eats a newline)."""
    _, text, _ = renderer.email("reset_requested", "en", CTX)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 3, text
    assert paragraphs[0].startswith("Someone asked") and "on 2026-12-02 01:00 UTC" in paragraphs[0]


def test_operator_folder_shadows_builtin(tmp_path):
    """A TEMPLATES_DIR file replaces the built-in one of the same name, and a catalog there overrides one
    translation while the rest still come from the built-in catalog."""
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "messages.j2").write_text((BUILTIN / "chat" / "messages.j2").read_text().replace(
        "{% block rate_limited %}", "{% block rate_limited %}SLOW DOWN. "))
    po = tmp_path / "locale" / "zh_TW" / "LC_MESSAGES"
    po.mkdir(parents=True)
    (po / "messages.po").write_text('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=utf-8\\n"\n\n'
                                    'msgid "Start over"\nmsgstr "從頭來過"\n', encoding="utf-8")
    r = Renderer(override_dir=str(tmp_path), globals={"brand_name": "B", "support_email": "s@b"})
    assert r.chat("rate_limited", "en").startswith("SLOW DOWN.")
    assert r.chat("rate_limited", "zh-TW").startswith("SLOW DOWN. 嘗試次數過多")
    assert r.button("start_over", "zh-TW") == "從頭來過"
    assert r.button("talk_to_person", "zh-TW") == "找真人客服"


def test_a_new_catalog_adds_a_language(tmp_path):
    """A catalog for a new locale in TEMPLATES_DIR makes that language offered and used."""
    po = tmp_path / "locale" / "fr" / "LC_MESSAGES"
    po.mkdir(parents=True)
    (po / "messages.po").write_text('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=utf-8\\n"\n\n'
                                    'msgid "Talk to a person"\nmsgstr "Parler à quelqu\'un"\n', encoding="utf-8")
    r = Renderer(override_dir=str(tmp_path), globals={"brand_name": "B", "support_email": "s@b"})
    assert "fr" in r.locales and r.pick("fr-FR") == "fr"
    assert r.button("talk_to_person", "fr") == "Parler à quelqu'un"
