"""The enroll, cancel and lock pages. Tokens travel in the URL, so every response forbids caching and
referrers; GET never changes anything (mail scanners prefetch links), only POST does. Every request is
counted per client address first (429 with Retry-After over the limit), whatever its token."""
from __future__ import annotations

import segno
from flask import Blueprint, current_app, make_response, request

from recovery.errors import (ClockOutOfSync, CodeReused, DirectoryError, NotFound, TokenError, TotpError,
                             WrongPassword)

bp = Blueprint("pages", __name__)

TOKEN_STATUS = {"unknown": 404, "used": 410, "expired": 410, "revoked": 410, "case_closed": 410,
                "step_out_of_order": 409, "other_browser": 403}


def _c():
    return current_app.extensions["recoverybot"]


def _lang(default: str = "en") -> str:
    lang = request.args.get("lang") or request.form.get("lang")
    return lang if lang in _c().renderer.locales else default


def _link_error(exc: TokenError, locale: str):
    return _c().renderer.page("link_error", locale, reason=exc.reason), TOKEN_STATUS.get(exc.reason, 400)


def _setup_page(view, locale: str, error: str | None = None, status: int = 200, **extra):
    qr = segno.make(view.uri, error="m").svg_inline(scale=5, dark="#1b1f24")
    key = " ".join(view.secret[i:i + 4] for i in range(0, len(view.secret), 4))
    return _c().renderer.page("enroll_setup", locale, qr_svg=qr, setup_key=key, otpauth=view.uri, error=error,
                              **extra), status


COOKIE = "rb_enroll"


def _with_browser_cookie(response, browser: str):
    c = _c()
    resp = make_response(response)
    resp.set_cookie(COOKIE, browser, max_age=c.deps.policy.link_ttl_minutes * 60, path="/enroll/",
                    httponly=True, samesite="Lax", secure=c.settings.PUBLIC_BASE_URL.startswith("https://"))
    return resp


@bp.route("/enroll/<token>", methods=["GET", "POST"])
def enroll(token: str):
    c = _c()
    browser = request.cookies.get(COOKIE)
    try:
        view = c.recovery.enroll_view(token, browser)
    except TokenError as exc:
        return _link_error(exc, _lang())
    locale = _lang(view.locale)
    if request.method == "GET":
        # GET never starts anything: mail scanners open links before people do.
        if view.step == "start":
            return c.renderer.page("enroll_start", locale, ask_password=view.ask_password)
        return _setup_page(view, locale)
    step = request.form.get("step", "")
    try:
        if step == "start":
            view, browser = c.recovery.start_setup(token, request.form.get("password", ""), browser)
            return _with_browser_cookie(_setup_page(view, locale), browser)
        if step == "confirm":
            codes = c.recovery.confirm_enroll(token, request.form.get("code", ""), browser)
            return c.renderer.page("enroll_done", locale, codes=codes, hold_until=view.hold_until)
    except TokenError as exc:
        return _link_error(exc, locale)
    except DirectoryError:
        return _directory_unavailable(locale)
    except WrongPassword:
        c.metrics.failure("enroll_wrong_password")
        try:
            c.recovery.enroll_view(token, browser)
        except TokenError as closed:  # too many failures closed the link
            return _link_error(closed, locale)
        return c.renderer.page("enroll_start", locale, ask_password=True, error="wrong_password"), 401
    except TotpError as exc:
        reason = ("clock_off" if isinstance(exc, ClockOutOfSync)
                  else "code_reused" if isinstance(exc, CodeReused) else "wrong_code")
        c.metrics.failure(f"enroll_{reason}")
        try:
            view = c.recovery.enroll_view(token, browser)
        except TokenError as closed:  # too many failures closed the link
            return _link_error(closed, locale)
        drift = getattr(exc, "drift_seconds", 0)
        return _setup_page(view, locale, error=reason, status=400, drift=abs(drift))
    return c.renderer.page("link_error", locale, reason="bad_step"), 400


@bp.before_request
def limit_link_lookups():
    """Every request to a link page counts against its client address, whatever the token."""
    c = _c()
    wait = c.recovery.link_lookup_allowed(request.remote_addr)
    if wait is None:
        return None
    c.metrics.failure("link_rate_limited")
    resp = make_response(c.renderer.page("link_error", _lang(), reason="rate_limited", minutes=-(-wait // 60)), 429)
    resp.headers["Retry-After"] = str(wait)
    return resp


def _directory_unavailable(locale: str):
    """The account service failed mid-step. The step's transaction rolled back, so nothing changed (the
    old factor still stands) and the same link works again: say so, and when to retry."""
    resp = make_response(_c().renderer.page("link_error", locale, reason="try_again"), 503)
    resp.headers["Retry-After"] = "60"
    return resp


def _owner_page(kind: str, token: str):
    """The cancel and lock pages: GET says what the button does, POST does it once."""
    c = _c()
    view_fn, act_fn = ((c.recovery.cancel_view, c.recovery.cancel_by_owner) if kind == "cancel"
                       else (c.recovery.lock_view, c.recovery.lock_by_owner))
    try:
        view = view_fn(token)
    except (TokenError, NotFound) as exc:
        return _link_error(exc if isinstance(exc, TokenError) else TokenError("unknown"), _lang())
    locale = _lang(view.locale)
    if request.method == "POST":
        try:
            view = act_fn(token)
        except DirectoryError:  # the lock's hold could not be placed: nothing was recorded, try again
            return _directory_unavailable(locale)
    return c.renderer.page(f"{kind}_page", locale, view=view)


@bp.route("/cancel/<token>", methods=["GET", "POST"])
def cancel(token: str):
    return _owner_page("cancel", token)


@bp.route("/lock/<token>", methods=["GET", "POST"])
def lock(token: str):
    return _owner_page("lock", token)
