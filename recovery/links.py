"""Re-enrollment, cancel and lock links.

Enroll tokens are 256 bits, stored as SHA-256, single use, short-lived, and only one is live per
account. The page's steps are: password (where the directory can check one), new secret and QR,
one confirming code, then recovery codes shown once. The account's old factor stays in place through
all of it: only the confirming code replaces it, in one operation through the directory. A case that
ends any other way leaves the account's second factor exactly as it was.

A cancel link acts on its own case only, and once. A lock link (from the completion email) holds
withdrawals and alerts staff, once per case.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from recovery import audit, timers, totp
from recovery.cases import LIVE_ENROLL_LINK, CaseService
from recovery.crypto import hash_recovery_code, new_recovery_codes, new_token, token_hash
from recovery.errors import DirectoryError, TokenError, TotpError, WrongPassword
from recovery.machine import FINAL, State
from recovery.models import AuditRecord, Case, LinkToken


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
    hold_until: datetime | None = None  # the withdrawal hold placed when the link was sent


@dataclass
class OwnerLinkView:
    """What the cancel and lock pages may show about their case: its state and what the link did."""
    case_id: str
    state: str
    locale: str
    outcome: str | None            # None on a GET; see cancel_by_owner and lock_by_owner
    used_at: datetime | None       # when this link (or, for lock, the case's lock) acted
    ended_at: datetime | None      # when the case reached its final state
    final_reason: str | None
    hold_until: datetime | None
    lock_hold_hours: int

    @property
    def lock_until(self) -> datetime | None:
        """The end of the owner's lock hold, once the lock has acted."""
        return self.used_at + timedelta(hours=self.lock_hold_hours) if self.used_at else None


RECOVERY_CODES = 8


class LinkService(CaseService):
    # ---- entering link_sent -----------------------------------------------------------------------

    def send_link(self, case: Case) -> None:
        """The notice window is over: place the hold, email a fresh link. The old factor stays."""
        rule = self.policy.rule(case.risk_level)
        self.directory.place_hold(case.account_id, case_id=case.id, hours=rule.hold_hours,
                                  reason="2fa_recovery")
        case.hold_until = self.now + timedelta(hours=rule.hold_hours)
        self._fire(case, "send_link")
        self._issue_enroll_link(case, "enroll_link", expires_at=self.now + timedelta(minutes=self.policy.link_ttl_minutes))
        timers.schedule_in(self.s, case.id, "link_expiry", self.now, minutes=self.policy.link_ttl_minutes)
        timers.schedule_in(self.s, case.id, "link_reminder", self.now, minutes=self.policy.link_reminder_minutes)
        self.notify.chat(case, case.conversation_id, "link_sent", locale=case.locale,
                         minutes=self.policy.link_ttl_minutes, hold_hours=rule.hold_hours)
        self.notify.staff(case, "link_sent", hold_hours=rule.hold_hours)

    def _issue_enroll_link(self, case: Case, template: str, *, expires_at) -> None:
        self.revoke_enroll_links(LinkToken.account_id == case.account_id)  # one live link per account
        token = new_token()
        self.s.add(LinkToken(token_hash=token_hash(token), kind="enroll", case_id=case.id,
                             account_id=case.account_id, created_at=self.now, expires_at=expires_at))
        minutes = max(1, int((expires_at - self.now).total_seconds() // 60))
        self.email_owner(case, template, link=f"{self.deps.public_base_url.rstrip('/')}/enroll/{token}", minutes=minutes,
                          hold_hours=self.policy.rule(case.risk_level).hold_hours,
                          hold_until=case.hold_until.isoformat() if case.hold_until else None)

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
                              ask_password=self.directory.supports_password, hold_until=case.hold_until)
        self._same_browser(row, browser)
        secret = self.deps.keyring.decrypt(row.pending_secret_enc)
        return EnrollView("setup", case.id, profile.email, profile.locale, secret,
                          totp.provisioning_uri(secret, name=profile.email, issuer=self.deps.brand_name),
                          hold_until=case.hold_until)

    def _same_browser(self, row: LinkToken, browser: str | None) -> None:
        if not browser or not hmac.compare_digest(token_hash(browser), row.browser_hash or ""):
            raise TokenError("other_browser")

    def start_setup(self, raw: str, password: str | None, browser: str | None) -> tuple[EnrollView, str]:
        """Check the password (where the directory can), make the new secret and recovery codes, and tie
        the link to this browser. Returns the view and the browser secret for the page to keep in a
        cookie. Nothing about the account changes here."""
        row, case = self._token(raw, "enroll", lock=True)
        if row.browser_hash is not None:
            return self._view(row, case, browser), browser
        if self.directory.supports_password:
            if not self.directory.verify_password(case.account_id, password or ""):
                self._link_failure(row, case)
                raise WrongPassword("wrong password")
        browser = new_token()
        row.password_ok_at, row.browser_hash = self.now, token_hash(browser)
        row.pending_secret_enc = self.deps.keyring.encrypt(totp.new_secret())
        # Made now and kept (encrypted) until the case completes, so a confirmation retried after a
        # timeout sends the directory the very same codes, and its per-case idempotency stays right.
        row.pending_codes_enc = self.deps.keyring.encrypt_json(new_recovery_codes(RECOVERY_CODES))
        audit.append(self.s, case_id=case.id, event="link_started", from_state=case.state, to_state=case.state,
                     actor="customer", channel="web",
                     reason="password checked" if self.directory.supports_password else None, at=self.now)
        return self._view(row, case, browser), browser

    def confirm(self, raw: str, code: str, browser: str | None) -> list[str]:
        """Replace the old factor with the new authenticator after one good code; returns the recovery
        codes, shown once."""
        row, case = self._token(raw, "enroll", lock=True)
        if row.browser_hash is None:
            raise TokenError("step_out_of_order")
        self._same_browser(row, browser)
        secret = self.deps.keyring.decrypt(row.pending_secret_enc)
        try:
            step = totp.verify(secret, code, now=self.now, last_step=None)
        except TotpError:
            self._link_failure(row, case)
            raise
        return self._replace_and_complete(row, case, step, actor="customer")

    def _replace_and_complete(self, row: LinkToken, case: Case, step: int, *, actor: str) -> list[str]:
        secret = self.deps.keyring.decrypt(row.pending_secret_enc)
        codes = self.deps.keyring.decrypt_json(row.pending_codes_enc)
        try:
            self.directory.replace_factor(case.account_id, secret=secret, step=step,
                                          recovery_code_hashes=[hash_recovery_code(c) for c in codes], case_id=case.id)
        except DirectoryError:
            # No clear answer: the directory may have replaced the factor all the same. Kept (the caller
            # commits it) so that the case cannot end as "unchanged" before a retry has settled it.
            row.replace_in_doubt_at, row.replace_step = row.replace_in_doubt_at or self.now, step
            raise
        row.used_at, row.pending_secret_enc, row.pending_codes_enc = self.now, None, None
        row.replace_in_doubt_at = None
        self._fire(case, "complete", actor=actor, channel="web")
        timers.cancel(self.s, case.id, self.now)
        self.email_owner(case, "completed", with_cancel=False,
                         lock_url=self.notify.lock_url(case, case.account_id),
                         lock_hold_hours=self.policy.owner_lock_hold_hours,
                         hold_until=case.hold_until.isoformat() if case.hold_until else None)
        self.notify.chat(case, case.conversation_id, "case_completed", locale=case.locale)
        self.notify.staff(case, "completed")
        return codes

    def settle_doubt(self, case: Case) -> bool:
        """Before a case in `link_sent` ends any other way: if its confirmation got no clear answer from
        the directory, retry it (same key, same data; the customer proved the new authenticator then).
        True when that completed the case. A directory still failing raises DirectoryError, and the ending
        waits (the timer retries; a page says to try again)."""
        row = self.s.scalar(select(LinkToken).where(LinkToken.case_id == case.id, LinkToken.kind == "enroll",
                                                    LinkToken.replace_in_doubt_at.is_not(None),
                                                    LinkToken.used_at.is_(None)).limit(1))
        if row is None or case.state != State.LINK_SENT:
            return False
        self._replace_and_complete(row, case, row.replace_step, actor="system")
        return True

    def _link_failure(self, row: LinkToken, case: Case) -> None:
        # Runs in the failing request's transaction, which the caller commits before showing the error.
        case.link_failures += 1
        if case.link_failures >= self.policy.link_max_password_failures and not self.settle_doubt(case):
            row.revoked_at = self.now
            self._fire(case, "cancel", actor="system", channel="web", reason="enroll_failures")
            self._closed(case, "cancelled")

    # ---- the cancel page --------------------------------------------------------------------------

    def cancel_view(self, raw: str) -> OwnerLinkView:
        row, case = self._token(raw, "cancel")
        return self._owner_view(row, case)

    def cancel_by_owner(self, raw: str) -> OwnerLinkView:
        """Cancel this link's own case, once. Returns what the page shows: `outcome` is "cancelled" when
        this request cancelled it, "already_used" when this link acted before, and "closed" when the
        case had already ended another way. Only "cancelled" changed anything."""
        row, case = self._token(raw, "cancel", lock=True)
        if row.used_at is not None:
            return self._owner_view(row, case, "already_used")
        if State(case.state) in FINAL:
            return self._owner_view(row, case, "closed")
        if self.settle_doubt(case):
            return self._owner_view(row, case, "closed")  # it had completed: the page says where the lock is
        row.used_at = self.now
        self._fire(case, "cancel", actor="owner", channel="email", reason="owner_cancelled")
        self._closed(case, "cancelled")
        return self._owner_view(row, case, "cancelled")

    # ---- the lock page (completion email) ----------------------------------------------------------

    def lock_view(self, raw: str) -> OwnerLinkView:
        row, case = self._token(raw, "lock")
        return self._owner_view(row, case, "already_used" if self._locked_at(case) else None)

    def lock_by_owner(self, raw: str) -> OwnerLinkView:
        """The owner says the completed recovery was not them: hold withdrawals and alert staff, once
        per case, whichever of the case's lock links is used."""
        row, case = self._token(raw, "lock", lock=True)
        if self._locked_at(case) is not None:
            return self._owner_view(row, case, "already_used")
        hours = self.policy.owner_lock_hold_hours
        if case.account_id:
            self.directory.place_hold(case.account_id, case_id=case.id, hours=hours, reason="owner_dispute")
        row.used_at = self.now
        audit.append(self.s, case_id=case.id, event="owner_locked", from_state=case.state,
                     to_state=case.state, actor="owner", channel="email", reason="owner_dispute", at=self.now)
        self.notify.staff(case, "owner_disputed", hold_hours=hours)
        return self._owner_view(row, case, "locked")

    def _locked_at(self, case: Case):
        return self.s.scalar(select(AuditRecord.at).where(AuditRecord.case_id == case.id,
                                                          AuditRecord.event == "owner_locked").limit(1))

    def _owner_view(self, row: LinkToken, case: Case, outcome: str | None = None) -> OwnerLinkView:
        ended = None
        if State(case.state) in FINAL:
            ended = self.s.scalar(select(AuditRecord.at).where(AuditRecord.case_id == case.id,
                                                               AuditRecord.to_state == case.state)
                                  .order_by(AuditRecord.id.desc()).limit(1))
        return OwnerLinkView(case_id=case.id, state=case.state, locale=case.locale, outcome=outcome,
                             used_at=row.used_at or self._locked_at(case) if row.kind == "lock" else row.used_at,
                             ended_at=ended, final_reason=case.final_reason,
                             hold_until=case.hold_until, lock_hold_hours=self.policy.owner_lock_hold_hours)
