"""HTTP helpers shared by the routes: JSON bodies and errors that say what is wrong."""
from __future__ import annotations

import json

from flask import request


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_body(*, optional: bool = False) -> dict:
    raw = request.get_data(cache=True)
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "empty_body", "the request body must be a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "not_an_object", "the request body must be a JSON object")
    return body
