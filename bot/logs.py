"""Logging set-up. Link tokens travel in URL paths, so access logs (werkzeug's and gunicorn's) are
filtered to mask them, and Bolt's request-body logging is kept quiet."""
from __future__ import annotations

import logging
import re

TOKEN_PATH = re.compile(r"/(enroll|cancel|lock)/[A-Za-z0-9_\-]+")


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is passed through untouched
            return True
        redacted = TOKEN_PATH.sub(lambda m: f"/{m.group(1)}/[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure(level: str | int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("werkzeug", "gunicorn.access", "gunicorn.error"):
        logging.getLogger(name).addFilter(RedactTokens())
    # On a failed signature check Bolt logs the whole request body, which is customer data.
    logging.getLogger("slack_bolt").setLevel(logging.WARNING)
