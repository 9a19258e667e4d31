"""Reset, re-enrollment and cancel links (DESIGN.md section 3, "Reset and re-enrollment").

Enroll tokens are 256 bits, stored as SHA-256, single use, short-lived, and only one is live per
account. The page's steps are: password (where the directory can check one), new secret and QR,
one confirming code, then recovery codes shown once.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from recovery import audit, timers, totp
from recovery.cases import LIVE_ENROLL_LINK, CaseService
from recovery.crypto import hash_password, new_recovery_codes, new_token, token_hash
from recovery.errors import TokenError, TotpError, WrongPassword
from recovery.machine import FINAL, OPEN, State
from recovery.models import Case, LinkToken


@dataclass
class EnrollView:
    """What the enroll page may show for a token at its current step."""
    step: str                      # start, setup
    case_id: str
    email: str
    locale: str
    secret: str | None = None
    uri: str | None = None
    ask_password: bool = False


class LinkService(CaseService):
    # ---- entering link_sent -----------------------------------------------------------------------

    def send_link(self, case: Case) -> None:
        """The notice window is over: reset the factor, place the hold, email a fresh link."""
        rule = self.policy.rule(case.risk_level)
        self.directory.reset_factor(case.account_id, case_id=case.id)
        self.directory.place_hold(case.account_id, case_id=case.id, hours=rule.hold_hours,
                                  reason="2fa_recovery")
        self._fire(case, "send_link")
        self._issue_enroll_link(case, "enroll_link", expires_at=self.now + timedelta(minutes=self.policy.link_ttl_minutes))
        timers.schedule_in(self.s, case.id, "link_expiry", self.now, minutes=self.policy.link_ttl_minutes)
        timers.schedule_in(self.s, case.id, "link_reminder", self.now, minutes=self.policy.link_reminder_minutes)
        self.notify.chat(case, case.conversation_id, "link_sent", locale=case.locale,
                         minutes=self.policy.link_ttl_minutes)
        self.notify.staff(case, "link_sent", hold_hours=rule.hold_hours)

    def _issue_enroll_link(self, case: Case, template: str, *, expires_at) -> None:
        self.revoke_enroll_links(LinkToken.account_id == case.account_id)  # one live link per account
        token = new_token()
        self.s.add(LinkToken(token_hash=token_hash(token), kind="enroll", case_id=case.id,
                             account_id=case.account_id, created_at=self.now, expires_at=expires_at))
        profile = self._owner(case)
        minutes = max(1, int((expires_at - self.now).total_seconds() // 60))
        self.notify.email(case, template, to=profile.email, locale=profile.locale, account_id=profile.id,
                          link=f"{self.deps.public_base_url.rstrip('/')}/enroll/{token}", minutes=minutes)

    def remind_link(self, case: Case) -> None:
        """Only the hash of the first link is kept, so the reminder carries a replacement link."""
        live = self._live_enroll(case)
        if live is None or live.browser_hash is not None:
            return  # used, revoked, or the customer is already on the page
        self._issue_enroll_link(case, "link_reminder", expires_at=live.expires_at)

    def _live_enroll(self, case: Case) -> LinkToken | None:
        return self.s.scalar(select(LinkToken).where(LinkToken.case_id == case.id, *LIVE_ENROLL_LINK))

    # ---- the enroll page --------------------------------------------------------------------------

    def _token(self, raw: str, kind: str, *, lock: bool = False) -> tuple[LinkToken, Case]:
        query = select(LinkToken).where(LinkToken.token_hash == token_hash(raw or ""), LinkToken.kind == kind)
        if lock:
            query = query.with_for_update()
        row = self.s.scalar(query)
        if row is None:
            raise TokenError("unknown")
        case = self.get(row.case_id, lock=lock)
        if kind == "enroll":
            if row.used_at is not None:
                raise TokenError("used")
            if row.revoked_at is not None:
                raise TokenError("revoked")
        if row.expires_at <= self.now:
            raise TokenError("expired")
        if kind == "enroll" and case.state != State.LINK_SENT:
            raise TokenError("case_closed")
        return row, case

    def enroll_view(self, raw: str, browser: str | None) -> EnrollView:
        """`browser` is the secret the page set in a cookie when the customer started; once a link is
        started in one browser, no other holder of the link can see the setup key or finish."""
        row, case = self._token(raw, "enroll")
        return self._view(row, case, browser)

    def _view(self, row: LinkToken, case: Case, browser: str | None) -> EnrollView:
        profile = self._owner(case)
        if row.browser_hash is None:
            return EnrollView("start", case.id, profile.email, profile.locale,
                              ask_password=self.directory.supports_password)
        self._same_browser(row, browser)
        secret = self.deps.keyring.decrypt(row.pending_secret_enc)
        return EnrollView("setup", case.id, profile.email, profile.locale, secret,
                          totp.provisioning_uri(secret, name=profile.email, issuer=self.deps.brand_name))

    def _same_browser(self, row: LinkToken, browser: str | None) -> None:
        if not browser or not hmac.compare_digest(token_hash(browser), row.browser_hash or ""):
            raise TokenError("other_browser")

    def start_setup(self, raw: str, password: str | None, browser: str | None) -> tuple[EnrollView, str]:
        """Check the password (where the directory can), make the new secret and tie the link to this
        browser. Returns the view and the browser secret for the page to keep in a cookie."""
        row, case = self._token(raw, "enroll", lock=True)
        if row.browser_hash is not None:
            return self._view(row, case, browser), browser
        if self.directory.supports_password:
            if not self.directory.verify_password(case.account_id, password or ""):
                self._link_failure(row, case, "wrong password on the re-enrollment page")
                raise WrongPassword("wrong password")
        browser = new_token()
        row.password_ok_at, row.browser_hash = self.now, token_hash(browser)
        row.pending_secret_enc = self.deps.keyring.encrypt(totp.new_secret())
        audit.append(self.s, case_id=case.id, event="link_started", from_state=case.state, to_state=case.state,
                     actor="customer", channel="web",
                     reason="password checked" if self.directory.supports_password else None, at=self.now)
        return self._view(row, case, browser), browser

    def confirm(self, raw: str, code: str, browser: str | None) -> list[str]:
        """Bind the new authenticator after one good code; returns the recovery codes, shown once."""
        row, case = self._token(raw, "enroll", lock=True)
        if row.browser_hash is None:
            raise TokenError("step_out_of_order")
        self._same_browser(row, browser)
        secret = self.deps.keyring.decrypt(row.pending_secret_enc)
        try:
            step = totp.verify(secret, code, now=self.now, last_step=None)
        except TotpError:
            self._link_failure(row, case, "too many wrong codes on the re-enrollment page")
            raise
        codes = new_recovery_codes(8)
        self.directory.bind_totp(case.account_id, secret=secret, step=step,
                                 recovery_code_hashes=[hash_password(c) for c in codes], case_id=case.id)
        row.used_at, row.pending_secret_enc = self.now, None
        self._fire(case, "complete", actor="customer", channel="web")
        timers.cancel(self.s, case.id, self.now)
        profile = self._owner(case)
        self.notify.email(case, "completed", to=profile.email, locale=profile.locale, account_id=profile.id)
        self.notify.chat(case, case.conversation_id, "case_completed", locale=case.locale)
        self.notify.staff(case, "completed")
        return codes

    def _link_failure(self, row: LinkToken, case: Case, reason: str) -> None:
        # Runs in the failing request's transaction, which the caller commits before showing the error.
        case.link_failures += 1
        if case.link_failures >= self.policy.link_max_password_failures:
            row.revoked_at = self.now
            self._fire(case, "cancel", actor="system", channel="web", reason=reason)
            self._closed(case, "cancelled")

    # ---- the cancel page --------------------------------------------------------------------------

    def cancel_view(self, raw: str) -> Case:
        return self._token(raw, "cancel")[1]

    def cancel_by_owner(self, raw: str) -> str:
        """Returns 'cancelled', 'already_closed' or 'disputed' (a completed case: hold and alert staff)."""
        row, case = self._token(raw, "cancel", lock=True)
        row.used_at = row.used_at or self.now
        others = self._cancel_other_open_cases(row.account_id, case)
        if case.state == State.COMPLETED:
            if case.account_id:
                self.directory.place_hold(case.account_id, case_id=case.id, hours=24 * 7, reason="owner_dispute")
            audit.append(self.s, case_id=case.id, event="owner_disputed", from_state=case.state,
                         to_state=case.state, actor="owner", channel="email", reason="owner says it was not them",
                         at=self.now)
            self.notify.staff(case, "owner_disputed")
            return "disputed"
        if State(case.state) in FINAL:
            return "cancelled" if others else "already_closed"
        self._fire(case, "cancel", actor="owner", channel="email", reason="the account owner cancelled")
        self._closed(case, "cancelled")
        return "cancelled"

    def _cancel_other_open_cases(self, account_id: str | None, case: Case) -> int:
        """'It wasn't me' is about the account, not one request. A second request while a case is open
        gets a case of its own (so the customer cannot tell), and the owner's notice for it carries that
        case's link: cancelling there must stop the open case too, or the reset would go on."""
        if not account_id:
            return 0
        ids = self.s.scalars(select(Case.id).where(Case.account_id == account_id, Case.id != case.id,
                                                   Case.state.in_([s.value for s in OPEN]))
                             .order_by(Case.id)).all()
        cancelled = 0
        for other_id in ids:
            other = self.get(other_id, lock=True)
            if State(other.state) in OPEN:  # it may have closed since the query
                self._fire(other, "cancel", actor="owner", channel="email", reason="the account owner cancelled")
                self._closed(other, "cancelled")
                cancelled += 1
        return cancelled
