"""Identity checks. Each yields a result (pass, fail, needs_review) with evidence for the approver.

Evidence never contains a code, a password or an answer's expected value: the approver sees whether
an answer matched, not what the account's facts are.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

PASS, FAIL, NEEDS_REVIEW, PENDING = "pass", "fail", "needs_review", "pending"
NEUTRAL = "neutral"  # a signal that adds nothing either way (say, a chat that is not logged in)

MONTHS = {name: i for i, names in enumerate(
    [("jan", "january"), ("feb", "february"), ("mar", "march"), ("apr", "april"), ("may",),
     ("jun", "june"), ("jul", "july"), ("aug", "august"), ("sep", "sept", "september"),
     ("oct", "october"), ("nov", "november"), ("dec", "december")], start=1) for name in names}

CURRENCY_ALIASES = {
    "tether": "USDT", "泰達幣": "USDT", "泰达币": "USDT", "bitcoin": "BTC", "比特幣": "BTC", "xbt": "BTC",
    "ether": "ETH", "ethereum": "ETH", "以太幣": "ETH", "usdollar": "USD", "dollar": "USD", "美元": "USD",
    "美金": "USD", "新台幣": "TWD", "台幣": "TWD", "ntd": "TWD", "nt": "TWD",
}


@dataclass(frozen=True)
class CheckResult:
    name: str
    result: str
    evidence: dict


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip().lower()
    return re.sub(r"[\s\.,;:!?'\"`()\[\]{}/\\_-]+", "", text)


def parse_month(text: str) -> str | None:
    """Read a year-month written many ways: 2023-05, 5/2023, May 2023, 2023年5月."""
    raw = unicodedata.normalize("NFKC", text).strip().lower()
    m = re.search(r"(\d{4})\s*[-/.年]\s*(\d{1,2})", raw)
    if m:
        year, month = int(m.group(1)), int(m.group(2))
    else:
        m = re.search(r"(\d{1,2})\s*[-/.]\s*(\d{4})", raw)
        if m:
            month, year = int(m.group(1)), int(m.group(2))
        else:
            year_m = re.search(r"(\d{4})", raw)
            word = re.search(r"([a-z]+)", raw)
            if not (year_m and word and word.group(1) in MONTHS):
                return None
            year, month = int(year_m.group(1)), MONTHS[word.group(1)]
    if not 1 <= month <= 12:
        return None
    return f"{year:04d}-{month:02d}"


def parse_currency(text: str) -> str:
    key = normalise(text)
    return CURRENCY_ALIASES.get(key, key.upper())


def _distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def fact_matches(name: str, expected: str, answer: str) -> bool:
    """Lenient: formats, case, punctuation and one typo in a longer answer are forgiven."""
    if not answer.strip():
        return False
    if name.endswith("_month"):
        return parse_month(answer) == parse_month(expected) is not None
    if name.endswith("_currency"):
        return parse_currency(answer) == parse_currency(expected)
    a, e = normalise(answer), normalise(expected)
    return a == e or (len(e) > 4 and _distance(a, e) <= 1)


def facts_to_ask(facts: dict[str, str], limit: int) -> list[str]:
    """Which facts to ask about, most telling first; stable so a resumed case asks the same ones."""
    preferred = ["first_deposit_month", "last_withdrawal_currency"]
    names = [n for n in preferred if n in facts] + sorted(n for n in facts if n not in preferred)
    return names[:limit]


def account_facts_result(answers: dict[str, bool]) -> CheckResult:
    right = sum(answers.values())
    total = len(answers)
    if total == 0:
        return CheckResult("account_facts", NEEDS_REVIEW, {"asked": 0, "note": "no facts on file"})
    result = PASS if right == total else (NEEDS_REVIEW if right else FAIL)
    return CheckResult("account_facts", result,
                       {"asked": total, "matched": right,
                        "per_question": {name: ("match" if ok else "no match") for name, ok in answers.items()}})
