"""Use cases as transactions: what channels and the CLI call.

Each method is one unit of work. Failures that must leave a trace (a wrong password on the enroll page,
a refused approval) are committed first and raised afterwards.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import timedelta

from recovery import audit, limits, timers
from recovery.cases import step_up_failure_key
from recovery.deps import Deps
from recovery.errors import ApprovalRefused, DirectoryError, TotpError, WrongPassword
from recovery.links import LinkService
from recovery.machine import State
from recovery.models import Approver, Attempt, Case

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, db, deps: Deps):
        self.db, self.deps = db, deps

    @contextmanager
    def service(self):
        with self.db.transaction() as session:
            yield LinkService(session, self.deps)

    def _commit_then_raise(self, fn, *args, errors=(WrongPassword, TotpError)):
        failure = None
        with self.service() as svc:
            try:
                return fn(svc, *args)
            except errors as exc:
                failure = exc
        raise failure

    # ---- approvals ----------------------------------------------------------------------------------

    def decide(self, case_id: str, *, approver: str, decision: str, reason: str | None = None,
               step_up_code: str | None = None, channel: str = "cli") -> Case:
        """One approver's decision in a transaction of its own (the CLI); a refusal is recorded in a second
        one, since the first rolled back."""
        try:
            with self.service() as svc:
                return svc.decide(case_id, approver=approver, decision=decision, reason=reason,
                                  step_up_code=step_up_code, channel=channel)
        except ApprovalRefused as exc:
            with self.service() as svc:
                record_refusal(svc, case_id, approver, channel, exc)
            raise

    # ---- links --------------------------------------------------------------------------------------

    def enroll_view(self, token: str, browser: str | None):
        with self.service() as svc:
            return svc.enroll_view(token, browser)

    def start_setup(self, token: str, password: str | None, browser: str | None):
        return self._commit_then_raise(lambda svc: svc.start_setup(token, password, browser))

    def confirm_enroll(self, token: str, code: str, browser: str | None) -> list[str]:
        # A directory that gave no clear answer leaves the link marked "in doubt" (committed), so the
        # case cannot end as unchanged before a retry settles whether the factor was replaced.
        return self._commit_then_raise(lambda svc: svc.confirm(token, code, browser),
                                       errors=(WrongPassword, TotpError, DirectoryError))

    def cancel_view(self, token: str):
        with self.service() as svc:
            return svc.cancel_view(token)

    def cancel_by_owner(self, token: str):
        with self.service() as svc:
            return svc.cancel_by_owner(token)

    def lock_view(self, token: str):
        with self.service() as svc:
            return svc.lock_view(token)

    def lock_by_owner(self, token: str):
        with self.service() as svc:
            return svc.lock_by_owner(token)

    def link_lookup_allowed(self, client: str | None) -> int | None:
        """Count one request to a link page from `client` (an IP address); None when allowed, else the
        seconds to wait. Counted before the token is looked at, so unknown, used, expired and live
        tokens are limited alike and the limit says nothing about which is which."""
        p = self.deps.policy
        key, window = f"link_lookup:ip:{client or '-'}", timedelta(minutes=p.link_lookup_window_minutes)
        with self.service() as svc:
            if limits.allow(svc.s, key, now=svc.now, limit=p.link_lookups_per_ip, window=window):
                return None
            return limits.retry_after(svc.s, key, now=svc.now, limit=p.link_lookups_per_ip, window=window)

    # ---- timers -------------------------------------------------------------------------------------

    def fire_due_timer(self) -> bool:
        """Fire one due timer in its own transaction; False when none is due.

        A failing handler (say the account backend is down during a reset) rolls back, and the timer
        is tried again a minute later instead of in a tight loop.
        """
        timer_id = None
        try:
            with self.service() as svc:
                timer = timers.claim_due(svc.s, svc.now, postgres=self.db.is_postgres)
                if timer is None:
                    return False
                timer_id, timer.fired_at = timer.id, svc.now
                case = svc.get(timer.case_id, lock=True)
                TIMER_HANDLERS[timer.kind](svc, case)
                return True
        except Exception:
            if timer_id is None:
                raise
            log.exception("timer %s failed; retrying in a minute", timer_id)
            with self.service() as svc:
                timers.postpone(svc.s, timer_id, svc.now, seconds=60)
            return True


def decide_within(svc: LinkService, case_id: str, *, approver: str, decision: str, reason: str | None = None,
                  step_up_code: str | None = None, channel: str, step_up_at=None) -> Case:
    """One approver's decision in the caller's transaction (the worker deciding a stored Slack submission,
    so the decision and the event's "processed" mark commit together). The decision runs in a savepoint:
    a refusal rolls back whatever it had begun, is recorded in the same transaction, and is raised.

    The approver's row is locked first, outside the savepoint: rolling back to a savepoint releases the
    locks taken inside it, and two workers deciding for one approver must see each other's wrong step-up
    codes, or the limit on them would not hold."""
    svc.s.get(Approver, approver, with_for_update=True)
    try:
        with svc.s.begin_nested():
            return svc.decide(case_id, approver=approver, decision=decision, reason=reason,
                              step_up_code=step_up_code, channel=channel, step_up_at=step_up_at)
    except ApprovalRefused as exc:
        record_refusal(svc, case_id, approver, channel, exc)
        raise


def record_refusal(svc: LinkService, case_id: str, approver: str, channel: str, exc: ApprovalRefused) -> None:
    """Audit a refused decision; a wrong step-up code also counts towards the approver's limit."""
    case = svc.get(case_id)
    audit.append(svc.s, case_id=case.id, event="approval_refused", from_state=case.state, to_state=case.state,
                 actor=approver, channel=channel, reason=exc.reason, at=svc.now)
    if exc.reason == "step_up_failed":
        svc.s.add(Attempt(key=step_up_failure_key(approver), at=svc.now))


def _code_expiry(svc: LinkService, case: Case) -> None:
    if case.state == State.VERIFYING and svc.check(case, "email_code").result != "pass":
        svc.notify.chat(case, case.conversation_id, "code_expired", locale=case.locale)


def _verifying_expiry(svc: LinkService, case: Case) -> None:
    if case.state == State.VERIFYING:
        svc.expire(case, "checks_timeout")


def _approval_nudge(event: str):
    def handler(svc: LinkService, case: Case) -> None:
        if case.state == State.AWAITING_APPROVAL:
            waited = int((svc.now - case.updated_at).total_seconds() // 60)
            svc.notify.staff(case, event, waited_minutes=waited, risk=case.risk_level)
    return handler


def _approval_expiry(svc: LinkService, case: Case) -> None:
    # An unanswered request never turns into a yes.
    if case.state == State.AWAITING_APPROVAL:
        svc.expire(case, "approval_timeout")


def _notice_window(svc: LinkService, case: Case) -> None:
    if case.state == State.APPROVED:
        svc.send_link(case)


def _link_expiry(svc: LinkService, case: Case) -> None:
    if case.state == State.LINK_SENT:
        svc.expire(case, "link_timeout")


def _link_reminder(svc: LinkService, case: Case) -> None:
    if case.state == State.LINK_SENT:
        svc.remind_link(case)


TIMER_HANDLERS = {
    "code_expiry": _code_expiry,
    "verifying_expiry": _verifying_expiry,
    "approval_reminder": _approval_nudge("approval_reminder"),
    "approval_escalation": _approval_nudge("approval_escalation"),
    "approval_expiry": _approval_expiry,
    "notice_window": _notice_window,
    "link_expiry": _link_expiry,
    "link_reminder": _link_reminder,
}
