"""Rendering of every customer-facing text from Jinja2 templates, per language.

The built-in templates ship inside this package (`bot/templates/`, read through importlib.resources,
so an installed wheel finds them wherever it lives). A folder named by TEMPLATES_DIR shadows them file
by file, so operators can change any wording without forking. Brand name, support email and similar values are globals that
come from settings, never text in templates.
"""
from __future__ import annotations

from datetime import datetime, timezone
from importlib.resources import files

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined
from markupsafe import Markup

BUILTIN = files(__name__)  # this package's folder: chat/, email/, slack/, web/
LOCALES = ("en", "zh-TW")


def when(value) -> str:
    """A moment as people read it in a notice: '2026-12-02 04:05 UTC'. Takes a datetime or ISO text."""
    if value is None or value == "":
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def pick_locale(locale: str | None) -> str:
    if not locale:
        return "en"
    if locale in LOCALES:
        return locale
    return "zh-TW" if locale.lower().startswith("zh") else "en"


class Renderer:
    def __init__(self, *, override_dir: str | None = None, globals: dict | None = None):
        loaders = [FileSystemLoader(override_dir)] if override_dir else []
        loaders.append(PackageLoader(__name__, "."))
        # Two environments over the same files: chat text and email text parts are plain text, while
        # pages and email HTML parts escape every value (a deny reason is typed by a person).
        self.text_env = Environment(loader=ChoiceLoader(loaders), undefined=StrictUndefined,
                                    autoescape=False, trim_blocks=True, lstrip_blocks=True)
        self.env = Environment(loader=ChoiceLoader(loaders), undefined=StrictUndefined,
                               autoescape=True, trim_blocks=True, lstrip_blocks=True)
        for env in (self.text_env, self.env):
            env.globals.update(globals or {})
            env.filters["when"] = when
        self.env.globals["t"] = self._t_for_page

    def block(self, template: str, name: str, context: dict, *, html: bool = False) -> str:
        tmpl = (self.env if html else self.text_env).get_template(template)
        if name not in tmpl.blocks:
            raise KeyError(f"template {template} has no block {name!r}")
        ctx = tmpl.new_context(dict(context))
        return "".join(tmpl.blocks[name](ctx)).strip()

    def has_block(self, template: str, name: str) -> bool:
        return name in self.text_env.get_template(template).blocks

    # ---- chat -------------------------------------------------------------------------------------

    def chat(self, key: str, locale: str, context: dict | None = None) -> str:
        """Plain text of one chat message (channels add their own markup)."""
        return str(self.block(f"chat/{pick_locale(locale)}.j2", key, context or {}))

    def button(self, key: str, locale: str) -> str:
        return self.chat(f"btn_{key}", locale)

    # ---- email ------------------------------------------------------------------------------------

    def email(self, name: str, locale: str, context: dict) -> tuple[str, str, str]:
        """(subject, text body, html body) of a named email."""
        path = f"email/{pick_locale(locale)}/{name}.j2"
        subject = self.block(path, "subject", context)
        text = self.block(path, "text", context)
        body = Markup(self.block(path, "html", context, html=True))
        html = self.env.get_template("email/layout.html").render(body=body, subject=subject,
                                                                 locale=pick_locale(locale), **context)
        return " ".join(subject.split()), text + "\n", html

    # ---- pages ------------------------------------------------------------------------------------

    def page(self, name: str, locale: str, **context) -> str:
        return self.env.get_template(f"web/{name}.html").render(locale=pick_locale(locale), **context)

    def _t_for_page(self, key: str, locale: str = "en", **context) -> Markup:
        return Markup(self.block(f"web/{pick_locale(locale)}.j2", key, context, html=True))
