"""Risk assessment: account signals plus what happened in the case, scored against the policy."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from recovery.checks import FAIL, NEEDS_REVIEW, PASS
from recovery.directory.interfaces import AccountProfile
from recovery.policy import Policy

WEIGHTS = {
    "email_changed": 4,
    "password_changed": 2,
    "phone_changed": 2,
    "new_device_login": 1,
    "young_account": 1,
    "earlier_recovery": 1,
    "not_logged_in": 1,
    "facts_not_matched": 2,
    "facts_partly_matched": 1,
    "high_balance": 2,
}


@dataclass(frozen=True)
class Assessment:
    level: str
    score: int
    reasons: tuple[str, ...]


def assess(profile: AccountProfile, *, policy: Policy, now: datetime, earlier_cases: int,
           verified_session: bool, check_results: dict[str, str]) -> Assessment:
    reasons: list[str] = []
    recent = now - timedelta(days=policy.recent_change_days)
    for kind in ("email_changed", "password_changed", "phone_changed", "new_device_login"):
        if any(e.type == kind and e.at >= recent for e in profile.events):
            reasons.append(kind)
    if profile.created_at > now - timedelta(days=policy.young_account_days):
        reasons.append("young_account")
    reasons.extend(["earlier_recovery"] * min(earlier_cases, 2))
    if not verified_session:
        reasons.append("not_logged_in")
    facts = check_results.get("account_facts")
    if facts == FAIL:
        reasons.append("facts_not_matched")
    elif facts == NEEDS_REVIEW:
        reasons.append("facts_partly_matched")
    if profile.balance_usd >= policy.high_balance_usd:
        reasons.append("high_balance")
    score = sum(WEIGHTS[r] for r in reasons)
    level = "high" if score >= policy.high_score else "medium" if score >= policy.medium_score else "low"
    if check_results.get("email_code") != PASS:
        level = "high"  # cannot happen through the flow; a belt to the state machine's braces
    return Assessment(level, score, tuple(reasons))
