"""The recovery case service: opening, identity checks, risk, approvals and timers.

Every method runs inside the caller's transaction (one unit of work): the state change, its audit
record and the messages it causes commit together or not at all.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recovery import audit, checks, limits, machine, timers, totp
from recovery.checks import FAIL, NEUTRAL, PASS, PENDING
from recovery.crypto import new_email_code
from recovery.deps import Deps
from recovery.errors import (ApprovalRefused, IllegalTransition, LimitReached, NotFound, StepUpRequired,
                             TotpError)
from recovery.machine import OPEN, State
from recovery.models import Approval, Approver, Attempt, Case, CaseCheck, Conversation, EmailCode, LinkToken
from recovery.risk import assess

log = logging.getLogger(__name__)
CODE_OK, CODE_WRONG, CODE_EXPIRED, CODE_LOCKED, CODE_REJECTED = "ok", "wrong", "expired", "locked", "rejected"


@dataclass(frozen=True)
class CodeOutcome:
    status: str
    remaining: int = 0


STEP_UP_MAX_FAILURES = 5
STEP_UP_WINDOW_MINUTES = 15
OWNER_NOTICE_HOURS = 6
RESET_NOTICES_PER_DAY = 3


# an enroll link that can still be used, were it not expired
LIVE_ENROLL_LINK = (LinkToken.kind == "enroll", LinkToken.used_at.is_(None), LinkToken.revoked_at.is_(None))


def step_up_failure_key(approver: str) -> str:
    return f"step_up_failed:{approver}"


_LOOK_UP = object()


def initiators(session: Session, case: Case, conv=_LOOK_UP) -> set[str]:
    """CaseService.initiators, for a caller with a session but no service (a read-only request).
    `conv` is the case's conversation (or None) when the caller has already read it."""
    if conv is _LOOK_UP:
        conv = session.get(Conversation, case.conversation_id) if case.conversation_id else None
    return {case.opened_by} | set((conv.data or {}).get("initiators", []) if conv else [])


def new_case_id() -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "RC-" + "".join(secrets.choice(alphabet) for _ in range(8))


class CaseService:
    def __init__(self, session: Session, deps: Deps):
        self.s, self.deps = session, deps
        self.now = deps.clock.now()
        self.policy = deps.policy
        self.directory = deps.directory_for(session)
        self.notify = deps.notifier(session, self.now)

    # ---- lookups -----------------------------------------------------------------------------

    def get(self, case_id: str, *, lock: bool = False) -> Case:
        query = select(Case).where(Case.id == case_id)
        if lock:
            query = query.with_for_update()
        case = self.s.scalar(query)
        if case is None:
            raise NotFound("case", case_id)
        return case

    def check(self, case: Case, name: str) -> CaseCheck | None:
        return self.s.scalar(select(CaseCheck).where(CaseCheck.case_id == case.id, CaseCheck.name == name))

    def set_check(self, case: Case, name: str, result: str, evidence: dict) -> None:
        row = self.check(case, name)
        if row is None:
            row = CaseCheck(case_id=case.id, name=name)
            self.s.add(row)
        row.result, row.evidence, row.updated_at = result, evidence, self.now

    def checks(self, case: Case) -> list[CaseCheck]:
        return list(self.s.scalars(select(CaseCheck).where(CaseCheck.case_id == case.id).order_by(CaseCheck.id)))

    def _fire(self, case: Case, event: str, *, actor: str = "system", channel: str = "system",
              reason: str | None = None, note: str | None = None) -> None:
        machine.fire(self.s, case, event, actor=actor, channel=channel, now=self.now, reason=reason, note=note)
        log.info("case %s: %s -> %s (%s)", case.id, event, case.state, actor)

    def _owner(self, case: Case):
        return self.directory.get(case.account_id) if case.account_id else None

    # ---- opening and the email code ------------------------------------------------------------

    def open(self, *, conversation_key: str, channel: str, email: str, locale: str,
             opened_by: str = "customer", verified_account_id: str | None = None,
             request_ip: str | None = None) -> Case:
        """Open a case for the account registered under `email`.

        The customer sees the same thing, at the same speed, whether or not the address is registered
        and whether or not its account may start a recovery now. Every start takes the same steps: the
        same queries, a code made and hashed, two emails written to the outbox. A start that cannot
        proceed (unknown address, a case already open, too many cases) gets a stand-in case with no
        account, which can never pass its code check; its emails are written but never sent, except
        the notice that tells a real owner what was refused and why.
        """
        profile = self.directory.find_by_email(email)
        refusal, open_case, resets_at = self._start_refusal(profile)
        contact = {"email": None, "locale": locale} if refusal else {"email": profile.email, "locale": profile.locale}
        case = Case(id=new_case_id(), state=State.OPENED.value,
                    account_id=None if refusal else profile.id, channel=channel,
                    conversation_id=conversation_key, opened_by=opened_by,
                    locale=locale, risk_reasons=[], created_at=self.now, updated_at=self.now,
                    owner_contact_enc=self.deps.keyring.encrypt_json(contact))
        self.s.add(case)
        self.s.flush()
        audit.append(self.s, case_id=case.id, event="open", from_state=None, to_state=case.state,
                     actor=opened_by, channel=channel, reason=refusal, at=self.now)
        self._fire(case, "start_checks")
        verified = bool(profile and verified_account_id == profile.id)
        # Not being in a logged-in chat is no failure: most customers who lost their phone are not.
        self.set_check(case, "verified_session", PASS if verified else NEUTRAL,
                       {"note": "logged-in chat user" if verified else "not a logged-in chat user"})
        self._send_code(case)
        timers.schedule_in(self.s, case.id, "verifying_expiry", self.now, hours=self.policy.verifying_ttl_hours)
        if refusal is None:
            # Told at every start, but not without end: starts that never pass the code cost an attacker
            # only a chat session, and each one's code email (with its cancel link) still goes out.
            told = limits.allow(self.s, f"reset_notice:{profile.id}", now=self.now, limit=RESET_NOTICES_PER_DAY,
                                window=timedelta(days=1))
            self.notify.email(case, "reset_requested", to=profile.email if told else None, locale=profile.locale,
                              account_id=profile.id, send=told,
                              **self._request_context(opened_by, channel, request_ip))
            return case
        context = dict(self._request_context(opened_by, channel, request_ip), reason=refusal,
                       open_case_id=open_case.id if open_case else None,
                       resets_at=resets_at.isoformat() if resets_at else None,
                       max_cases=self.policy.max_cases_per_30_days)
        if open_case is not None:
            context["cancel_url"] = self.notify.cancel_url(open_case, profile.id)
        if refusal == "unknown_email" or not self._owner_notice_due(profile):
            # Nobody to tell (or told recently): the same work as a notice, from the same context (one
            # that failed to render would be retried, and the delay would tell), never sent.
            self.notify.email(case, "start_refused", to=None, locale=locale, account_id=None, with_cancel=False,
                              send=False, **context)
        else:
            self.notify.email(case, "start_refused", to=profile.email, locale=profile.locale,
                              account_id=profile.id, with_cancel=False, **context)
        return case

    def _start_refusal(self, profile) -> tuple[str | None, Case | None, object]:
        """Why this start cannot proceed (or None), the account's open case, and when the 30-day limit
        frees a place. The same two queries run for an unknown address, so timing tells nothing."""
        account_id = profile.id if profile is not None else ""
        open_cases = list(self.s.scalars(select(Case).where(Case.account_id == account_id,
                                                            Case.state.in_([s.value for s in OPEN]))
                                         .order_by(Case.created_at)))
        recent = list(self.s.scalars(select(Case.created_at).where(
            Case.account_id == account_id, Case.created_at >= self.now - timedelta(days=30),
            Case.id.in_(self._verified_cases())).order_by(Case.created_at)))
        open_case = open_cases[0] if open_cases else None
        if profile is None:
            return "unknown_email", None, None
        if len(open_cases) >= self.policy.max_open_cases_per_account:
            return "case_already_open", open_case, None
        if len(recent) >= self.policy.max_cases_per_30_days:
            frees = recent[len(recent) - self.policy.max_cases_per_30_days]
            return "too_many_cases", open_case, frees + timedelta(days=30)
        return None, None, None

    @staticmethod
    def _verified_cases():
        """Cases whose emailed code was typed right: only these count as recoveries of the account. A start
        anyone can make by naming an address (and never pass) must not use up the owner's cases or
        raise their risk."""
        return select(CaseCheck.case_id).where(CaseCheck.name == "email_code", CaseCheck.result == PASS)

    def _contact(self, case: Case) -> tuple[str | None, str]:
        """The owner's address and language as read at the start (None for a stand-in)."""
        contact = self.deps.keyring.decrypt_json(case.owner_contact_enc) if case.owner_contact_enc else {}
        return contact.get("email"), contact.get("locale") or case.locale

    def email_owner(self, case: Case, template: str, **context) -> None:
        """Email the owner: the same work for a stand-in, which has no owner and sends nothing."""
        to, locale = self._contact(case)
        self.notify.email(case, template, to=to, locale=locale, account_id=case.account_id, send=to is not None,
                          **context)

    def initiators(self, case: Case) -> set[str]:
        """Who may not decide on this case: whoever opened it, and every teammate who started a recovery in
        its conversation (a customer who then switches address opens a new case, started all the same)."""
        return initiators(self.s, case)

    def _owner_notice_due(self, profile) -> bool:
        # A refused start still tells the owner, but at most once in a while: new chat sessions are free,
        # and a flood would bury the notice that matters.
        return limits.allow(self.s, f"owner_notice:{profile.id}", now=self.now, limit=1,
                            window=timedelta(hours=OWNER_NOTICE_HOURS))

    def _request_context(self, opened_by: str, channel: str, ip: str | None) -> dict:
        """What a security notice says about the request: when, where, who started it, and from which
        network address (where the channel knows it; the web chat does)."""
        return {"requested_at": self.now.isoformat(), "request_channel": channel,
                "by_staff": opened_by != "customer", "request_ip": ip}

    def _send_code(self, case: Case) -> None:
        """Make, store (hashed) and email a new code."""
        self.s.execute(update(EmailCode).where(EmailCode.case_id == case.id).values(superseded=True))
        code = new_email_code()
        expires = self.now + timedelta(minutes=self.policy.code_ttl_minutes)
        self.s.add(EmailCode(case_id=case.id, code_hash=self.deps.keyring.code_hash(case.id, code),
                             expires_at=expires))
        case.code_sends += 1
        self.set_check(case, "email_code", PENDING, {"sent": case.code_sends, "wrong_tries": case.code_failures})
        # Only the newest code's expiry is news: the replaced code's timer would call a live code expired.
        timers.cancel(self.s, case.id, self.now, kinds=("code_expiry",))
        timers.schedule(self.s, case.id, "code_expiry", expires)
        # A stand-in case writes the same email, never sent: it has no account to send it to.
        self.email_owner(case, "verification_code", code=code, minutes=self.policy.code_ttl_minutes)

    def resend_code(self, case_id: str) -> None:
        case = self.get(case_id, lock=True)
        if case.state != State.VERIFYING or self.check(case, "email_code").result == PASS:
            raise IllegalTransition(case.id, "resend_code", case.state)
        if case.code_sends > self.policy.code_max_resends:
            raise LimitReached("code resends")
        self._send_code(case)

    def submit_code(self, case_id: str, code: str) -> CodeOutcome:
        case = self.get(case_id, lock=True)
        email_check = self.check(case, "email_code")
        if case.state != State.VERIFYING or email_check is None or email_check.result == PASS:
            raise IllegalTransition(case.id, "submit_code", case.state)
        code = "".join(code.split())
        live = self.s.scalar(select(EmailCode).where(EmailCode.case_id == case.id,
                                                     EmailCode.superseded.is_(False),
                                                     EmailCode.used_at.is_(None)))
        if live is not None and self.deps.keyring.code_matches(case.id, code, live.code_hash):
            if live.expires_at <= self.now:
                return CodeOutcome(CODE_EXPIRED)
            live.used_at = self.now
            self.set_check(case, "email_code", PASS, {"sent": case.code_sends, "wrong_tries": case.code_failures})
            timers.cancel(self.s, case.id, self.now, kinds=("code_expiry",))
            profile = self._owner(case)
            if profile is not None and not profile.totp_enabled:
                # The customer proved they hold the mailbox, so saying this reveals nothing new.
                self._fire(case, "reject", reason="2FA is not enabled on this account")
                self._closed(case, "rejected")
                return CodeOutcome(CODE_REJECTED)
            self._prepare_facts(case)
            return CodeOutcome(CODE_OK)
        case.code_failures += 1
        self.set_check(case, "email_code", PENDING if case.code_failures < self.policy.code_max_wrong else FAIL,
                       {"sent": case.code_sends, "wrong_tries": case.code_failures})
        if case.code_failures >= self.policy.code_max_wrong:
            self._fire(case, "lock", reason="too many wrong email codes")
            self._closed(case, "locked")
            return CodeOutcome(CODE_LOCKED)
        return CodeOutcome(CODE_WRONG, self.policy.code_max_wrong - case.code_failures)

    # ---- account facts --------------------------------------------------------------------------

    def _prepare_facts(self, case: Case) -> None:
        profile = self._owner(case)
        names = checks.facts_to_ask(profile.facts if profile else {}, self.policy.facts_to_ask)
        self.set_check(case, "account_facts", PENDING, {"questions": names, "answers": {}})
        if not names:
            self._finish_checks(case)

    def next_question(self, case: Case) -> str | None:
        row = self.check(case, "account_facts")
        if row is None or row.result != PENDING:
            return None
        asked = row.evidence.get("answers", {})
        return next((n for n in row.evidence["questions"] if n not in asked), None)

    def answer_fact(self, case_id: str, answer: str) -> str | None:
        """Record the answer to the current question; returns the next question, or None when done."""
        case = self.get(case_id, lock=True)
        name = self.next_question(case) if case.state == State.VERIFYING else None
        if name is None:
            raise IllegalTransition(case.id, "answer_fact", case.state)
        row = self.check(case, "account_facts")
        profile = self._owner(case)
        matched = bool(profile) and checks.fact_matches(name, profile.facts.get(name, ""), answer[:200])
        evidence = dict(row.evidence, answers=dict(row.evidence["answers"], **{name: matched}))
        row.evidence = evidence
        following = self.next_question(case)
        if following is None:
            self._finish_checks(case)
        return following

    def _finish_checks(self, case: Case) -> None:
        row = self.check(case, "account_facts")
        result = checks.account_facts_result(row.evidence.get("answers", {}) if row else {})
        self.set_check(case, "account_facts", result.result, result.evidence)
        profile = self._owner(case)
        if profile is None:  # unreachable: a decoy never passes the code check
            self._fire(case, "reject", reason="no account")
            return
        earlier = self.s.scalar(select(func.count(Case.id)).where(
            Case.account_id == case.account_id, Case.id != case.id,
            Case.created_at >= self.now - timedelta(days=365), Case.id.in_(self._verified_cases())))
        results = {c.name: c.result for c in self.checks(case)}
        assessment = assess(profile, policy=self.policy, now=self.now, earlier_cases=earlier,
                            verified_session=results.get("verified_session") == PASS, check_results=results)
        case.risk_level, case.risk_reasons = assessment.level, list(assessment.reasons)
        self._fire(case, "request_approval", reason=f"risk {assessment.level}")
        timers.cancel(self.s, case.id, self.now, kinds=("verifying_expiry", "code_expiry"))
        p = self.policy
        timers.schedule_in(self.s, case.id, "approval_reminder", self.now, minutes=p.approval_reminder_minutes)
        timers.schedule_in(self.s, case.id, "approval_escalation", self.now, minutes=p.approval_escalation_minutes)
        timers.schedule_in(self.s, case.id, "approval_expiry", self.now, hours=p.approval_expiry_hours)
        self.notify.staff(case, "approval_requested", risk=assessment.level, reasons=list(assessment.reasons))

    # ---- approvals -------------------------------------------------------------------------------

    def decide(self, case_id: str, *, approver: str, decision: str, reason: str | None = None,
               step_up_code: str | None = None, channel: str = "cli", step_up_at: datetime | None = None) -> Case:
        """Record one approver's decision; raises ApprovalRefused (or a subclass) and changes nothing.

        `step_up_at` is when the approver gave the step-up code, where that was before now (a submission
        decided by the worker): the code is checked against the time it was typed, not the time it is read."""
        # the case, locked, with its conversation (who started it) in the same round trip
        row = self.s.execute(select(Case, Conversation)
                             .outerjoin(Conversation, Conversation.key == Case.conversation_id)
                             .where(Case.id == case_id).with_for_update(of=Case)).first()
        if row is None:
            raise NotFound("case", case_id)
        case, conv = row
        if approver not in self.deps.approver_ids and approver not in self.deps.security_approver_ids:
            raise ApprovalRefused(case.id, approver, "not_authorized", f"{approver} is not an approver")
        if approver in initiators(self.s, case, conv):
            raise ApprovalRefused(case.id, approver, "initiator",
                                  "you opened this case for the customer, so someone else must decide")
        if case.state != State.AWAITING_APPROVAL:
            raise IllegalTransition(case.id, decision, case.state)
        decided = list(self.s.scalars(select(Approval).where(Approval.case_id == case.id)))
        if any(a.approver == approver for a in decided):
            raise ApprovalRefused(case.id, approver, "already_decided", "you already decided on this case")
        if decision == "deny":
            return self._deny(case, approver, reason, channel)
        if decision != "approve":
            raise ValueError(f"unknown decision {decision!r}")
        rule = self.policy.rule(case.risk_level)
        in_security = approver in self.deps.security_approver_ids
        previous = [a for a in decided if a.decision == "approve"]
        would_complete = len(previous) + 1 >= rule.approvals
        if (rule.needs_security_approver and would_complete and not in_security
                and not any(a.security_group for a in previous)):
            raise ApprovalRefused(case.id, approver, "security_approver_required",
                                  "this high-risk case needs an approval from the security group")
        if rule.step_up:
            self._step_up(case, approver, step_up_code, at=step_up_at or self.now)
        self.s.add(Approval(case_id=case.id, approver=approver, decision="approve", security_group=in_security,
                            reason=reason, at=self.now))
        audit.append(self.s, case_id=case.id, event="approval", from_state=case.state, to_state=case.state,
                     actor=approver, channel=channel, reason=None, note=reason, at=self.now)
        if not would_complete:
            self.notify.staff(case, "approval_recorded", approver=approver,
                              remaining=rule.approvals - len(previous) - 1)
            return case
        self._fire(case, "approve", actor=approver, channel=channel, note=reason)
        timers.cancel(self.s, case.id, self.now)
        timers.schedule_in(self.s, case.id, "notice_window", self.now, hours=rule.notice_hours)
        self.email_owner(case, "approved", notice_hours=rule.notice_hours, hold_hours=rule.hold_hours)
        if rule.notice_hours:
            # Without a notice window the link follows at once, and its own message says it is approved.
            self.notify.chat(case, case.conversation_id, "case_approved", locale=case.locale,
                             notice_hours=rule.notice_hours, hold_hours=rule.hold_hours)
        self.notify.staff(case, "approved", approver=approver)
        return case

    def _deny(self, case: Case, approver: str, reason: str | None, channel: str) -> Case:
        reason = (reason or "").strip()
        if not reason:
            raise ApprovalRefused(case.id, approver, "reason_required", "a denial needs a reason")
        self.s.add(Approval(case_id=case.id, approver=approver, decision="deny", reason=reason[:1000], at=self.now,
                            security_group=approver in self.deps.security_approver_ids))
        self._fire(case, "deny", actor=approver, channel=channel, note=reason)
        self._closed(case, "denied")
        return case

    def _step_up(self, case: Case, approver: str, code: str | None, *, at: datetime) -> None:
        row = self.s.get(Approver, approver, with_for_update=True)
        if row is None:
            raise StepUpRequired(case.id, approver, "step_up_not_enrolled",
                                 f"this case needs a code from your own authenticator; enroll first with "
                                 f"`recoverybot approvers enroll {approver}`")
        if not code:
            raise StepUpRequired(case.id, approver, "step_up_required",
                                 "this case needs a current code from your own authenticator")
        # Wrong codes are counted (by Recovery.decide, after the refusal): without a limit, a stolen Slack
        # session could guess its way past the one control meant to stop it.
        failures = self.s.scalar(select(func.count(Attempt.id)).where(
            Attempt.key == step_up_failure_key(approver),
            Attempt.at > self.now - timedelta(minutes=STEP_UP_WINDOW_MINUTES)))
        if failures >= STEP_UP_MAX_FAILURES:
            raise StepUpRequired(case.id, approver, "step_up_locked",
                                 f"too many wrong step-up codes; try again in {STEP_UP_WINDOW_MINUTES} minutes")
        try:
            row.last_step = totp.verify(self.deps.keyring.decrypt(row.totp_secret_enc), code, now=at,
                                        last_step=row.last_step)
        except TotpError as exc:
            raise StepUpRequired(case.id, approver, "step_up_failed", f"step-up code refused: {exc}") from None

    # ---- endings -----------------------------------------------------------------------------------

    def revoke_enroll_links(self, *where) -> None:
        self.s.execute(update(LinkToken).where(*LIVE_ENROLL_LINK, *where).values(revoked_at=self.now))

    def _closed(self, case: Case, outcome: str) -> None:
        """Shared aftermath of a final state: timers stop, links die, everyone concerned is told."""
        timers.cancel(self.s, case.id, self.now)
        self.revoke_enroll_links(LinkToken.case_id == case.id)
        self.email_owner(case, outcome, with_cancel=False, reason=case.final_reason,
                         hold_until=case.hold_until.isoformat() if case.hold_until else None)
        self.notify.chat(case, case.conversation_id, f"case_{outcome}", locale=case.locale)
        self.notify.staff(case, outcome, reason=case.final_reason)

    def cancel(self, case_id: str, *, actor: str, channel: str, reason: str) -> Case:
        case = self.get(case_id, lock=True)
        if self.settle_doubt(case):
            return case
        self._fire(case, "cancel", actor=actor, channel=channel, reason=reason)
        self._closed(case, "cancelled")
        return case

    def settle_doubt(self, case: Case) -> bool:
        """Overridden where links live (recovery.links.LinkService): nothing is in doubt here."""
        return False

    def expire(self, case: Case, reason: str) -> None:
        if self.settle_doubt(case):
            return
        self._fire(case, "expire", reason=reason)
        self._closed(case, "expired")
