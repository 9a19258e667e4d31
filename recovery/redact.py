"""Secrets a customer may paste in chat, found and masked before the text is stored or logged.

Kinds (the names channels see in `TurnResult.secrets`):
- "recovery_phrase": 12 or more BIP-39 words in a row (8 or more after words such as "seed phrase"),
  in any language the `mnemonic` package ships a word list for. Chinese words are single characters,
  so they count only when separated as wallets show them ("的 一 是"); unspaced, they are a sentence;
- "private_key": a WIF or extended private key (a raw hex key is not told apart from a transaction id);
- "recovery_code": one of our own backup codes (four dash-separated groups of five hex digits);
- "password": what follows "my password is", "password:", "密碼是" and the like;
- "code": six digits, as an authenticator or our email shows them ("482913", "482 913", "482-913").

Masking errs on the side of hiding: a false positive costs a word in the transcript, a false negative
leaves a secret at rest.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import NamedTuple

from mnemonic import Mnemonic

CODE_MASK = "••••••"
MASKS = {"recovery_phrase": "[recovery phrase hidden]", "private_key": "[private key hidden]",
         "recovery_code": "[recovery code hidden]", "password": "[password hidden]", "code": CODE_MASK}
PHRASE_WORDS = 12
PHRASE_WORDS_AFTER_CUE = 8

# Six digits that are not part of a longer number, an identifier (a case id, an address), a price
# ($100000) or an amount ("150000 usdt").
CODE = re.compile(r"(?<![\dA-Za-z$])(?<!\d[ \-])(?:\d{6}|\d{3}[ \-]\d{3}|\d(?: \d){5})(?![ \-]?\d)(?![A-Za-z])"
                  r"(?!\s*(?:usdt|usd|twd|ntd|btc|eth|元|塊))", re.I)
RECOVERY_CODE = re.compile(r"(?<![0-9a-f])[0-9a-f]{5}(?:-?[0-9a-f]{5}){3}(?![0-9a-f])", re.I)
PRIVATE_KEY = re.compile(r"(?<![1-9A-HJ-NP-Za-km-z])(?:[5KL][1-9A-HJ-NP-Za-km-z]{50,51}|"
                         r"[xyzt]prv[1-9A-HJ-NP-Za-km-z]{100,108})(?![1-9A-HJ-NP-Za-km-z])")
PASSWORD = re.compile(
    r"(?:\b(?:password|passcode|passwd|pwd|pw)\b\s*(?:is|was|=|:|：)\s*|\bpass\s*[:=]\s*|"
    r"(?:密碼|密码)\s*(?:是|為|为|:|：|=)\s*)"
    r"(?P<secret>\"[^\"]+\"|'[^']+'|“[^”]+”|「[^」]+」|[\x21-\x7e]+)", re.I)
# "my password is wrong" is not a secret: the words that commonly follow in a complaint.
NOT_A_PASSWORD = frozenset(
    "wrong correct right not incorrect invalid fine ok okay same too very still being working expired "
    "changed reset long short strong weak the a an my your it this that there here also definitely "
    "probably please lost forgotten forgot stolen compromised leaked saved stored".split())
PHRASE_CUE = re.compile(r"seed|mnemonic|recovery (?:phrase|words)|secret (?:phrase|words)|backup phrase|"
                        r"助記詞|助记词|種子|种子|註記詞|恢復短語|恢复短语", re.I)
# A token of a phrase: letters (Latin, CJK, Hangul, Cyrillic...), separated by anything else such as
# spaces, commas, line breaks or list numbers ("1. abandon 2. ability").
WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
EMAIL = re.compile(r"[^@\s<>(),;:]+@[^@\s<>(),;:]+\.[A-Za-z]{2,}")


class Redaction(NamedTuple):
    text: str                 # the text with every secret masked
    kinds: tuple[str, ...]    # the kinds found, in a fixed order, each once

    @property
    def found(self) -> bool:
        return bool(self.kinds)


def _fold(word: str) -> str:
    """Lower case without accents, as BIP-39 normalises (NFKD) Spanish or French words."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.lower()) if not unicodedata.combining(c))


@lru_cache(maxsize=1)
def _wordlists() -> dict[str, frozenset[str]]:
    return {lang: frozenset(_fold(w) for w in Mnemonic(lang).wordlist) for lang in Mnemonic.list_languages()}


def _phrase_spans(text: str, minimum: int) -> list[tuple[int, int]]:
    """Spans of `minimum` or more consecutive words from one BIP-39 list. One word that is not in the
    list may sit inside a run (a typo in a typed phrase); it counts, but cannot start or end one."""
    lists = _wordlists()
    spans: list[tuple[int, int]] = []
    run: list[re.Match] = []
    langs: set[str] = set()
    typo: re.Match | None = None

    def close() -> None:
        if run and run[-1] is typo:
            run.pop()
        if len(run) >= minimum:
            spans.append((run[0].start(), run[-1].end()))

    for m in WORD.finditer(text):
        word = _fold(m.group())
        here = {lang for lang, words in lists.items() if word in words}
        adjacent = bool(run) and _separators_only(text[run[-1].end():m.start()])
        if adjacent and langs & here:
            run.append(m)
            langs &= here
            continue
        if adjacent and typo is None and 3 <= len(word) <= 8:
            run.append(m)
            typo = m
            continue
        close()
        run, langs, typo = ([m], here, None) if here else ([], set(), None)
    close()
    return spans


def _separators_only(gap: str) -> bool:
    """What may stand between two words of a pasted phrase: spaces, commas, list numbers ("2." "3)"),
    but not a sentence's end."""
    return len(gap) <= 8 and not re.sub(r"\d+[.)]?|[\s,;/|、，；\-]", "", gap)


def redact(text: str) -> Redaction:
    """Mask every secret in `text`; the kinds found say what the customer should be warned about."""
    found: list[str] = []
    minimum = PHRASE_WORDS_AFTER_CUE if PHRASE_CUE.search(text) else PHRASE_WORDS
    spans = _phrase_spans(text, minimum)
    if spans:
        found.append("recovery_phrase")
        for start, end in reversed(spans):
            text = text[:start] + MASKS["recovery_phrase"] + text[end:]
    for kind, pattern in (("private_key", PRIVATE_KEY), ("recovery_code", RECOVERY_CODE)):
        text, n = pattern.subn(MASKS[kind], text)
        if n:
            found.append(kind)
    passwords = []
    text = PASSWORD.sub(lambda m: _mask_password(m, passwords), text)
    if passwords:
        found.append("password")
    text, n = _codes_outside_emails(text)
    if n:
        found.append("code")
    return Redaction(text, tuple(found))


def _codes_outside_emails(text: str) -> tuple[str, int]:
    """Mask six-digit codes, but not digits that are part of an email address (123456@example.com is
    someone's address, typed when the bot asked for it, not a code)."""
    out, count, last = [], 0, 0
    for email in EMAIL.finditer(text):
        masked, n = CODE.subn(CODE_MASK, text[last:email.start()])
        out += [masked, email.group(0)]
        count, last = count + n, email.end()
    masked, n = CODE.subn(CODE_MASK, text[last:])
    return "".join(out) + masked, count + n


def _mask_password(m: re.Match, masked: list) -> str:
    if m.group("secret").strip("\"'“”「」.,!?").lower() in NOT_A_PASSWORD:
        return m.group(0)
    masked.append(True)
    return m.group(0)[: m.start("secret") - m.start()] + MASKS["password"]


def redact_text(text: str) -> str:
    """Just the masked text, for transcripts and logs."""
    return redact(text).text
