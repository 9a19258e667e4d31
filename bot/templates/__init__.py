"""Rendering of every customer-facing text from Jinja2 templates, one template per message, translated
through gettext catalogs.

The templates hold the English text as msgids (`{% trans %}` blocks and `_()`, jinja2.ext.i18n); each
other language is a Babel catalog, `locale/<ll_CC>/LC_MESSAGES/messages.po`, beside the templates.
Adding a language is adding a catalog: the locales offered are English plus every catalog found.
Catalogs are read from their `.po` source and compiled in memory at start-up, so a stale `.mo` can never
ship; `pybabel compile` is not needed (docs/guidance.md, "Languages and catalogs").

The built-in templates ship inside this package (`bot/templates/`, read through importlib.resources,
so an installed wheel finds them wherever it lives). A folder named by TEMPLATES_DIR shadows them file
by file, and a catalog in `TEMPLATES_DIR/locale/` is merged over the built-in one (its entries win), so
operators can change any wording, in any language, without forking. Brand name, support email and
similar values are globals that come from settings, never text in templates.
"""
from __future__ import annotations

import io
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined
from markupsafe import Markup

BUILTIN = files(__name__)  # this package's folder: chat/, email/, slack/, web/, locale/
SOURCE = "en"  # the language the templates are written in (the msgids)
DOMAIN = "messages"


def catalog_locales(folder) -> list[str]:
    """Locales ("zh-TW") with a catalog under `folder`/locale/<ll_CC>/LC_MESSAGES/messages.po."""
    root = Path(str(folder)) / "locale"
    if not root.is_dir():
        return []
    return sorted(d.name.replace("_", "-") for d in root.iterdir()
                  if (d / "LC_MESSAGES" / f"{DOMAIN}.po").is_file())


LOCALES = tuple([SOURCE] + [loc for loc in catalog_locales(BUILTIN) if loc != SOURCE])


def when(value) -> str:
    """A moment as people read it in a notice: '2026-12-02 04:05 UTC'. Takes a datetime or ISO text."""
    if value is None or value == "":
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def pick_locale(locale: str | None, offered=LOCALES) -> str:
    """The offered locale closest to `locale` ("zh" and "zh-Hant" pick "zh-TW"), else English."""
    if not locale:
        return SOURCE
    if locale in offered:
        return locale
    language = locale.replace("_", "-").split("-")[0].lower()
    return next((o for o in offered if o.split("-")[0].lower() == language), SOURCE)


def _read_catalog(path: Path) -> Translations:
    with path.open("rb") as f:
        catalog = read_po(f, domain=DOMAIN)
    buf = io.BytesIO()
    write_mo(buf, catalog, use_fuzzy=False)  # a fuzzy (unreviewed) entry shows the English instead
    buf.seek(0)
    return Translations(buf, domain=DOMAIN)


def load_translations(locale: str, folders) -> NullTranslations:
    """The catalog for `locale`: each folder's catalog merged over the ones before it."""
    found: NullTranslations | None = None
    for folder in folders:
        path = Path(str(folder)) / "locale" / locale.replace("-", "_") / "LC_MESSAGES" / f"{DOMAIN}.po"
        if path.is_file():
            t = _read_catalog(path)
            if found is None:
                found = t
            else:
                found.merge(t)
    return found or NullTranslations()


class Renderer:
    """Renders chat texts, button labels, emails and pages in any offered locale."""

    def __init__(self, *, override_dir: str | None = None, globals: dict | None = None):
        loaders = [FileSystemLoader(override_dir)] if override_dir else []
        loaders.append(PackageLoader(__name__, "."))
        self.loader = ChoiceLoader(loaders)
        self.globals = dict(globals or {})
        self.folders = [BUILTIN] + ([override_dir] if override_dir else [])
        self.locales = tuple(dict.fromkeys([SOURCE, *LOCALES, *catalog_locales(override_dir or "")]))
        self._envs: dict[tuple[str, bool], Environment] = {}
        # Kept for callers that inspect the templates (the CSP hashes the pages' inline blocks).
        self.text_env, self.env = self._env(SOURCE, False), self._env(SOURCE, True)

    def _env(self, locale: str, html: bool) -> Environment:
        """One environment per language and kind: chat and email text parts are plain text, while pages
        and email HTML parts escape every value (a deny reason is typed by a person)."""
        key = (locale, html)
        env = self._envs.get(key)
        if env is None:
            # Plain text keeps every newline the template has (trim_blocks would eat the one after a tag and
            # run lines together); in HTML they do not matter.
            # auto_reload off: a template is read once per process. Checking each file's time at every use
            # cost a chat turn a stat() per block, and a page changed on disk would not match the CSP
            # hashes taken at start-up (bot/csp.py) anyway; catalogs are read once as well.
            env = Environment(loader=self.loader, undefined=StrictUndefined, autoescape=html, trim_blocks=html,
                              lstrip_blocks=True, extensions=["jinja2.ext.i18n"], auto_reload=False)
            env.install_gettext_translations(load_translations(locale, self.folders), newstyle=True)
            env.globals.update(self.globals, locale=locale)
            env.filters["when"] = when
            if html:
                env.globals["t"] = self._t_for_page
            self._envs[key] = env
        return env

    def pick(self, locale: str | None) -> str:
        return pick_locale(locale, self.locales)

    def block(self, template: str, name: str, context: dict, *, html: bool = False, locale: str = SOURCE) -> str:
        tmpl = self._env(self.pick(locale), html).get_template(template)
        if name not in tmpl.blocks:
            raise KeyError(f"template {template} has no block {name!r}")
        ctx = tmpl.new_context(dict(context))
        return "".join(tmpl.blocks[name](ctx)).strip()

    def has_block(self, template: str, name: str) -> bool:
        return name in self.text_env.get_template(template).blocks

    # ---- chat -------------------------------------------------------------------------------------

    def chat(self, key: str, locale: str, context: dict | None = None) -> str:
        """Plain text of one chat message (channels add their own markup)."""
        return str(self.block("chat/messages.j2", key, context or {}, locale=locale))

    def button(self, key: str, locale: str) -> str:
        return self.chat(f"btn_{key}", locale)

    # ---- email ------------------------------------------------------------------------------------

    def email(self, name: str, locale: str, context: dict) -> tuple[str, str, str]:
        """(subject, text body, html body) of a named email."""
        locale = self.pick(locale)
        path = f"email/{name}.j2"
        subject = self.block(path, "subject", context, locale=locale)
        text = self.block(path, "text", context, locale=locale)
        body = Markup(self.block(path, "html", context, html=True, locale=locale))
        html = self._env(locale, True).get_template("email/layout.html").render(
            body=body, subject=subject, **dict(context, locale=locale))
        return " ".join(subject.split()), text + "\n", html

    # ---- pages ------------------------------------------------------------------------------------

    def page(self, name: str, locale: str, **context) -> str:
        locale = self.pick(locale)
        return self._env(locale, True).get_template(f"web/{name}.html").render(
            **dict(context, locale=locale, locales=self.locales))

    def _t_for_page(self, key: str, locale: str = SOURCE, **context) -> Markup:
        return Markup(self.block("web/texts.j2", key, context, html=True, locale=locale))
