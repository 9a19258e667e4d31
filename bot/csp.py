"""The Content-Security-Policy of every response.

Nothing runs or styles a page unless it is in our templates: each inline <script> and <style> block of
the web templates (an operator's TEMPLATES_DIR included) is allowed by its SHA-256 hash, computed from
the template source when the app starts. Hashing the source, never the rendered page, matters: a value
that slipped into a page could not allow itself. Blocks that hold template code would hash differently
on every page, so they are refused at start-up, as are inline event-handler attributes.
"""
from __future__ import annotations

import base64
import hashlib
import re

INLINE = re.compile(r"<(script|style)\b[^>]*>(.*?)</\1\s*>", re.S | re.I)
HANDLER_ATTR = re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.I)
TEMPLATE_CODE = ("{{", "{%", "{#")


class UnhashableTemplate(ValueError):
    pass


def _hash(body: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def inline_hashes(env) -> tuple[list[str], list[str]]:
    """(script hashes, style hashes) of the inline blocks in every web/*.html template of `env`."""
    scripts, styles = set(), set()
    names = env.list_templates(filter_func=lambda n: n.startswith("web/") and n.endswith(".html"))
    for name in names:
        source = env.loader.get_source(env, name)[0]
        if HANDLER_ATTR.search(INLINE.sub("", source)):
            raise UnhashableTemplate(f"{name}: inline event handlers (on...=) cannot be allowed by a strict "
                                     "CSP; attach them from a script instead")
        for kind, body in INLINE.findall(source):
            if any(mark in body for mark in TEMPLATE_CODE):
                raise UnhashableTemplate(f"{name}: an inline <{kind}> holds template code, so its hash would "
                                         "change from page to page; pass values through data- attributes")
            (scripts if kind.lower() == "script" else styles).add(_hash(body))
    return sorted(scripts), sorted(styles)


def policy(env) -> str:
    scripts, styles = inline_hashes(env)
    return "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(scripts) or "'none'"),
        "style-src " + (" ".join(styles) or "'none'"),
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ])
