"""TOTP with pyotp: one step of tolerance either side, replay protection, and a clock-drift hint."""
from __future__ import annotations

from datetime import datetime

import pyotp

from recovery.errors import ClockOutOfSync, CodeReused, WrongCode

STEP = 30
WINDOW = 1            # accepted: one time step either side
DRIFT_SEARCH = 10     # beyond the window, up to 5 minutes off means "your clock is wrong"


def new_secret() -> str:
    return pyotp.random_base32()  # 160 bits


def provisioning_uri(secret: str, *, name: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=issuer)


def normalise(code: str) -> str:
    return "".join(ch for ch in str(code) if not ch.isspace())


def verify(secret: str, code: str, *, now: datetime, last_step: int | None) -> int:
    """Return the time step the code belongs to; raise WrongCode, CodeReused or ClockOutOfSync.

    The caller stores the returned step as the new `last_step`, so the same code (or an older one)
    cannot be used again.
    """
    code = normalise(code)
    if len(code) != 6 or not code.isdigit():
        raise WrongCode("a code has six digits")
    totp = pyotp.TOTP(secret)
    current = int(now.timestamp()) // STEP
    for offset in sorted(range(-WINDOW, WINDOW + 1), key=abs):
        step = current + offset
        if pyotp.utils.strings_equal(totp.at(step * STEP), code):
            if last_step is not None and step <= last_step:
                raise CodeReused("this code was already used")
            return step
    for offset in sorted(range(-DRIFT_SEARCH, DRIFT_SEARCH + 1), key=abs):
        if abs(offset) > WINDOW and pyotp.utils.strings_equal(totp.at((current + offset) * STEP), code):
            raise ClockOutOfSync(offset * STEP)
    raise WrongCode("wrong code")
