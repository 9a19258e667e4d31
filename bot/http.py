"""HTTP helpers shared by the routes: JSON bodies and errors that say what is wrong."""
from __future__ import annotations

import json

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_body(*, optional: bool = False) -> dict:
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # Werkzeug cuts a chunked body off at the limit instead of refusing it
        raise RequestEntityTooLarge()
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "empty_body", "the request body must be a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise ApiError(400, "malformed_json", "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "not_an_object", "the request body must be a JSON object")
    return body


def storable_text(value: str) -> bool:
    """False for strings no database column takes: NUL (PostgreSQL refuses it) or lone surrogates
    (valid in JSON escapes, but not encodable as UTF-8)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
