"""Risk levels and the policy table (docs/configuration.md, "The risk policy").

Operators override parts of it with the RISK_POLICY environment variable, a JSON object such as
`{"levels": {"medium": {"notice_hours": 12}}, "max_cases_per_30_days": 2}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class LevelRule:
    approvals: int
    notice_hours: int
    hold_hours: int
    needs_security_approver: bool = False
    step_up: bool = False


def _default_levels() -> dict[str, LevelRule]:
    return {
        "low": LevelRule(approvals=1, notice_hours=0, hold_hours=24),
        "medium": LevelRule(approvals=1, notice_hours=24, hold_hours=48),
        "high": LevelRule(approvals=2, notice_hours=72, hold_hours=24 * 7,
                          needs_security_approver=True, step_up=True),
    }


@dataclass(frozen=True)
class Policy:
    levels: dict[str, LevelRule] = field(default_factory=_default_levels)
    # score thresholds: score >= high_score is high, >= medium_score is medium
    medium_score: int = 2
    high_score: int = 4
    recent_change_days: int = 14
    young_account_days: int = 30
    high_balance_usd: int = 10_000
    max_open_cases_per_account: int = 1
    max_cases_per_30_days: int = 3
    code_ttl_minutes: int = 10
    code_max_wrong: int = 5
    code_max_resends: int = 3
    facts_to_ask: int = 2
    link_ttl_minutes: int = 60
    link_reminder_minutes: int = 30
    link_max_password_failures: int = 5
    verifying_ttl_hours: int = 24
    approval_reminder_minutes: int = 30
    approval_escalation_minutes: int = 120
    approval_expiry_hours: int = 72
    attempts_per_contact_per_hour: int = 10
    attempts_per_ip_per_hour: int = 30
    # starting a case (typing an email address), per chat contact and per client address
    case_starts_per_contact_per_hour: int = 3
    case_starts_per_ip_per_hour: int = 10
    # opening or posting enroll, cancel and lock pages, per client address, over a sliding window
    link_lookups_per_ip: int = 30
    link_lookup_window_minutes: int = 10
    # the hold placed when the owner says a completed recovery was not them
    owner_lock_hold_hours: int = 24 * 7

    def rule(self, level: str) -> LevelRule:
        return self.levels[level]

    @classmethod
    def from_overrides(cls, overrides: dict) -> "Policy":
        if not isinstance(overrides, dict):
            raise ValueError("RISK_POLICY must be a JSON object")
        base = cls()
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"RISK_POLICY has unknown keys: {', '.join(unknown)}")
        changes: dict = {}
        for key, value in overrides.items():
            if key == "levels":
                changes["levels"] = _merge_levels(base.levels, value)
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"RISK_POLICY.{key} must be a non-negative integer")
            else:
                changes[key] = value
        policy = replace(base, **changes)
        if policy.high_score <= policy.medium_score:
            raise ValueError("RISK_POLICY: high_score must be greater than medium_score")
        return policy


def _merge_levels(base: dict[str, LevelRule], value) -> dict[str, LevelRule]:
    if not isinstance(value, dict) or set(value) - set(LEVELS):
        raise ValueError(f"RISK_POLICY.levels must be an object with keys among {LEVELS}")
    merged = dict(base)
    rule_names = {f.name for f in fields(LevelRule)}
    for level, rule in value.items():
        if not isinstance(rule, dict) or set(rule) - rule_names:
            raise ValueError(f"RISK_POLICY.levels.{level} may only set {sorted(rule_names)}")
        merged[level] = replace(base[level], **rule)
        if merged[level].approvals < 1:
            # An unanswered request must never turn into a yes: zero approvals is not a policy.
            raise ValueError(f"RISK_POLICY.levels.{level}.approvals must be at least 1")
    return merged
