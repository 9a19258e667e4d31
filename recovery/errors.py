"""The domain's errors: a small hierarchy whose members carry the data a caller needs to act."""
from __future__ import annotations


class RecoveryError(Exception):
    """Base of every error the domain raises on purpose."""


class ConfigError(RecoveryError):
    """A setting is missing or malformed; the message names it."""


class NotFound(RecoveryError):
    def __init__(self, what: str, key: str):
        super().__init__(f"{what} {key!r} not found")
        self.what, self.key = what, key


class IllegalTransition(RecoveryError):
    """The event is not allowed from the case's current state; nothing was changed."""

    def __init__(self, case_id: str, event: str, state: str):
        super().__init__(f"event {event!r} is not allowed in state {state!r} (case {case_id})")
        self.case_id, self.event, self.state = case_id, event, state


class ConcurrentChange(IllegalTransition):
    """Someone else moved the case first (double click, second worker); nothing was changed."""


class ApprovalRefused(RecoveryError):
    """An approver may not make this decision. `reason` is a stable code for audits and replies."""

    def __init__(self, case_id: str, approver: str, reason: str, message: str):
        super().__init__(message)
        self.case_id, self.approver, self.reason = case_id, approver, reason


class StepUpRequired(ApprovalRefused):
    """Policy requires the approver's own TOTP code and none, or a wrong one, was given."""


class LimitReached(RecoveryError):
    """A case or attempt limit was hit; `retry_after` is seconds, when known."""

    def __init__(self, what: str, retry_after: int | None = None):
        super().__init__(f"limit reached: {what}")
        self.what, self.retry_after = what, retry_after


class TokenError(RecoveryError):
    """A link token cannot be used. `reason`: unknown, expired, used, revoked, case_closed."""

    def __init__(self, reason: str):
        super().__init__(f"link cannot be used: {reason}")
        self.reason = reason


class TotpError(RecoveryError):
    """Base of TOTP verification failures."""


class WrongCode(TotpError):
    pass


class CodeReused(TotpError):
    pass


class ClockOutOfSync(TotpError):
    """The code would match a few time steps away: the phone's clock is off, not the code."""

    def __init__(self, drift_seconds: int):
        super().__init__(f"authenticator clock is about {drift_seconds} s off")
        self.drift_seconds = drift_seconds


class WrongPassword(RecoveryError):
    pass


class DirectoryError(RecoveryError):
    """The account directory failed or answered something we cannot use."""


class DirectoryUnavailable(DirectoryError):
    """The account directory did not answer (no connection, no answer in time, HTTP 5xx or 429): worth
    trying again in a while, unlike an answer we cannot use (a refused token, a malformed body)."""


class ImportProblem(RecoveryError):
    """An account import file is bad; `where` names the record (e.g. accounts[3].email)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
