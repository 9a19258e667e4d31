"""Staff notifications. Without Slack, the local twin writes them to the log (and so the console),
where the operator running `recoverybot serve` acts with `recoverybot cases approve|deny`."""
from __future__ import annotations

import logging

from recovery.outbox import Outgoing

log = logging.getLogger("recoverybot.staff")


class ConsoleStaffNotifier:
    def send(self, message: Outgoing) -> None:
        p = message.payload
        details = ", ".join(f"{k}={v}" for k, v in sorted(p.get("context", {}).items()))
        hint = ""
        if p["event"] == "approval_requested":
            hint = (f" -> run `recoverybot cases show {p['case_id']}`, then "
                    f"`recoverybot cases approve {p['case_id']} --approver NAME`")
        log.warning("[staff] case %s: %s%s%s", p["case_id"], p["event"],
                    f" ({details})" if details else "", hint)


class StaffDirectory:
    """Who a teammate who starts a case in Intercom is among the approvers, so the rule that an initiator
    never approves their own case can be applied.

    First the mapping setting (INTERCOM_ADMIN_SLACK_IDS: Intercom admin id -> approver id), then, when
    Slack is configured, Slack's `users.lookupByEmail` on the teammate's Intercom email. No match means
    no case: a case whose initiator is unknown could be approved by that same person.
    """

    def __init__(self, *, mapping: dict[str, str], slack_client=None):
        self.mapping, self.slack = dict(mapping), slack_client

    def approver_id(self, admin_id: str, email: str | None) -> str | None:
        if admin_id in self.mapping:
            return self.mapping[admin_id]
        if self.slack is None or not email:
            return None
        from slack_sdk.errors import SlackApiError

        try:
            user = self.slack.users_lookupByEmail(email=email).get("user") or {}
        except SlackApiError as exc:
            if (exc.response.get("error") if hasattr(exc.response, "get") else None) == "users_not_found":
                return None
            raise  # Slack down or throttling: the inbox tries the event again later
        found = user.get("id")
        return found if isinstance(found, str) and found else None
