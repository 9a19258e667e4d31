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
