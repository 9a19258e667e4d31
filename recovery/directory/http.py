"""The http account directory: the exchange's backend, over the JSON API in docs/account-api.md.

Every failure the bot cannot act on (network error, timeout, 5xx, a refused token, a body that does
not match the contract) raises DirectoryError; the caller's timer retries. Nothing is retried here.
Messages and logs name the method, the path and the status, never the token, a password, a TOTP
secret or code, nor a response body (a backend might echo what it was sent).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit

import requests

from recovery import totp
from recovery.directory.interfaces import AccountProfile, SecurityEvent
from recovery.errors import ClockOutOfSync, ConfigError, DirectoryError, DirectoryUnavailable

log = logging.getLogger(__name__)

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class HttpDirectory:
    supports_password = True

    def __init__(self, *, base_url: str, token: str, timeout: float = 5.0,
                 session: requests.Session | None = None):
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("ACCOUNT_API_URL must be an absolute http(s) URL")
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ConfigError("ACCOUNT_API_URL must use https (plain http only for localhost): "
                              "the bot sends passwords and TOTP secrets to it")
        if not token:
            raise ConfigError("ACCOUNT_API_TOKEN is required for the http account directory")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.session = session or requests.Session()

    def __repr__(self) -> str:  # keeps the token out of reprs in tracebacks and debuggers
        return f"HttpDirectory(base_url={self.base_url!r})"

    # ---- transport --------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None, *,
              idempotency_key: str | None = None) -> tuple[int, object]:
        """Send one request; return (status, parsed JSON or None). Raises DirectoryError for
        network failures, redirects, 5xx and a 2xx whose body is not JSON."""
        what = f"account API {method} {path}"
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        try:
            resp = self.session.request(method, self.base_url + path, json=body, headers=headers,
                                        timeout=self.timeout, allow_redirects=False)
        except requests.Timeout:
            raise DirectoryUnavailable(f"{what}: no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise DirectoryUnavailable(f"{what}: request failed ({type(exc).__name__})") from None
        status = resp.status_code
        log.debug("%s -> %s", what, status)
        if status in (401, 403):
            raise DirectoryError(f"{what}: HTTP {status}, the backend refused the token "
                                 f"(check ACCOUNT_API_TOKEN and its scope)")
        if status == 404 or not 200 <= status < 300:
            return status, None
        if status == 204 or not resp.content:
            return status, None
        try:
            return status, resp.json()
        except ValueError:
            raise DirectoryError(f"{what}: HTTP {status} with a body that is not JSON") from None

    def _expect(self, status: int, ok: tuple[int, ...], what: str) -> None:
        if status == 404:
            raise DirectoryError(f"{what}: no such account (HTTP 404)")
        if status >= 500 or status == 429:
            raise DirectoryUnavailable(f"{what}: HTTP {status}, the backend is unavailable")
        if status not in ok:
            raise DirectoryError(f"{what}: unexpected HTTP {status}")

    @staticmethod
    def _key(case_id: str, operation: str) -> str:
        return f"recoverybot:{case_id}:{operation}"

    @staticmethod
    def _acct(account_id: str) -> str:
        return "/accounts/" + quote(str(account_id), safe="")

    # ---- lookups ----------------------------------------------------------------------------------

    def find_by_email(self, email: str) -> AccountProfile | None:
        email = email.strip().lower()
        # POST, not GET ?email=: keeps the address out of URLs and so out of proxy and access logs.
        status, data = self._call("POST", "/accounts/lookup", {"email": email})
        if status == 404:
            return None
        self._expect(status, (200,), "account lookup by email")
        profile = _profile(data, "account lookup by email")
        if profile.email.lower() != email:
            raise DirectoryError("account lookup by email: the backend answered another address")
        return profile

    def get(self, account_id: str) -> AccountProfile | None:
        status, data = self._call("GET", self._acct(account_id))
        if status == 404:
            return None
        self._expect(status, (200,), f"account {account_id!r}")
        profile = _profile(data, f"account {account_id!r}")
        if profile.id != account_id:
            raise DirectoryError(f"account {account_id!r}: the backend answered another account")
        return profile

    def verify_password(self, account_id: str, password: str) -> bool:
        status, data = self._call("POST", self._acct(account_id) + "/password/verify",
                                  {"password": password})
        if status == 404:
            return False
        self._expect(status, (200,), "password check")
        return _bool_ok(data, "password check")

    # ---- changes ----------------------------------------------------------------------------------

    def place_hold(self, account_id: str, *, case_id: str, hours: int, reason: str) -> None:
        status, _ = self._call("POST", self._acct(account_id) + "/holds",
                               {"case_id": case_id, "hours": hours, "reason": reason},
                               idempotency_key=self._key(case_id, f"hold:{reason}"))
        self._expect(status, (200, 201, 204), "withdrawal hold")

    def replace_factor(self, account_id: str, *, secret: str, step: int, recovery_code_hashes: list[str],
                       case_id: str) -> None:
        # The backend checks the exchange's logins, so it needs the secret itself (TLS in transit,
        # encrypted at rest on its side). One key per case: the bot confirms a case at most once, and a
        # retry after a timeout carries the same secret and the same recovery codes (kept encrypted on
        # the link until the case completes), so answering it from the first call is right.
        status, _ = self._call("POST", self._acct(account_id) + "/2fa/replace",
                               {"case_id": case_id, "secret": secret, "step": step,
                                "recovery_code_hashes": list(recovery_code_hashes)},
                               idempotency_key=self._key(case_id, "replace_factor"))
        self._expect(status, (200, 201, 204), "2FA factor replacement")

    def verify_totp(self, account_id: str, code: str, *, now: datetime) -> bool:
        status, data = self._call("POST", self._acct(account_id) + "/2fa/verify",
                                  {"code": totp.normalise(code), "at": _iso(now)})
        self._expect(status, (200,), "TOTP check")
        ok = _bool_ok(data, "TOTP check")
        if not ok and data.get("reason") == "clock_skew":
            drift = data.get("drift_seconds")
            if not isinstance(drift, int) or isinstance(drift, bool):
                raise DirectoryError("TOTP check: clock_skew answer without an integer drift_seconds")
            raise ClockOutOfSync(drift)
        return ok


# ---- parsing --------------------------------------------------------------------------------------

def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bool_ok(data: object, what: str) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise DirectoryError(f"{what}: expected a JSON object with a boolean 'ok'")
    return data["ok"]


def _timestamp(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise DirectoryError(f"{what}: expected an ISO 8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise DirectoryError(f"{what}: {value!r} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        raise DirectoryError(f"{what}: timestamp {value!r} has no time zone")
    return parsed.astimezone(timezone.utc)


def _profile(data: object, what: str) -> AccountProfile:
    """Build a profile from account JSON, refusing anything that does not match the contract."""
    if not isinstance(data, dict):
        raise DirectoryError(f"{what}: expected a JSON object")

    def field(name: str, kind: type | tuple[type, ...], default: object = ...) -> object:
        if name not in data and default is not ...:
            return default
        value = data.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DirectoryError(f"{what}: field {name!r} is missing or has the wrong type")
        return value

    facts = field("facts", dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in facts.items()):
        raise DirectoryError(f"{what}: 'facts' must map strings to strings")
    events = []
    for i, event in enumerate(field("events", list, [])):
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise DirectoryError(f"{what}: events[{i}] needs a string 'type'")
        events.append(SecurityEvent(event["type"], _timestamp(event.get("at"), f"{what}: events[{i}].at")))
    events.sort(key=lambda e: e.at)
    return AccountProfile(
        id=field("id", str), email=field("email", str), locale=field("locale", str, "en"),
        created_at=_timestamp(data.get("created_at"), f"{what}: created_at"),
        totp_enabled=field("totp_enabled", bool), facts=dict(facts), events=tuple(events),
        balance_usd=field("balance_usd", int, 0))
