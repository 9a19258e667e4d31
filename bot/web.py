"""The Flask app: the HTTP routes (listed in docs/operations.md), security headers and error handling."""
from __future__ import annotations

import logging
import re
import uuid

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from bot import csp, logs, pages, webchat
from bot.health import readiness
from bot.http import ApiError
from bot.webchat import request_locale
from bot.intercom import webhook as intercom_webhook
from bot.metrics import CONTENT_TYPE, Exposition, authorized
from recovery.db import driver_error, is_outage

log = logging.getLogger(__name__)
MAX_BODY = 256 * 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{8,64}")  # what proxies such as Heroku's router send
# A database restart or failover takes seconds; the pool reconnects by itself once it is back.
RETRY_AFTER = 5
OUTAGE_MESSAGE = f"the service's database is briefly unavailable; nothing was done: try again in {RETRY_AFTER} seconds"


def create_app(container) -> Flask:
    app = Flask(__name__)
    if container.settings.TRUSTED_PROXIES:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Behind a load balancer every request comes from the balancer: per-IP limits need the client.
        hops = container.settings.TRUSTED_PROXIES
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions["recoverybot"] = container
    app.register_blueprint(webchat.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(intercom_webhook.bp)
    # Socket Mode alone (SLACK_APP_TOKEN, no signing secret) gets no HTTP route: nothing could verify it.
    if container.slack_app is not None and container.settings.SLACK_SIGNING_SECRET.strip():
        from slack_bolt.adapter.flask.handler import to_flask_response

        from bot.slack import gate

        container.slack_app.error(_slack_error)

        @app.post("/slack/events")
        def slack_events():
            bolt_request, refusal = gate.check(request.get_data(cache=True), request.headers,
                                               signing_secret=container.settings.SLACK_SIGNING_SECRET.strip())
            if refusal is not None:
                raise ApiError(refusal.status, refusal.error, refusal.message)
            return to_flask_response(container.slack_app.dispatch(bolt_request))

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz():
        ready, checks = readiness(container)
        return jsonify(status="ok" if ready else "unavailable", checks=checks), 200 if ready else 503

    exposition = Exposition(container.metrics, container.db_metrics)

    @app.get("/metrics")
    def metrics():
        if not authorized(request.headers.get("Authorization"), container.settings.METRICS_TOKEN):
            return Response("unauthorized\n", status=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(exposition.render(), content_type=CONTENT_TYPE)

    @app.get("/")
    def index():
        return Response(status=302, headers={"Location": "/chat"})

    policy = csp.policy(container.renderer.env)  # refuses, at start-up, pages it could not allow

    @app.before_request
    def bind_request_id():
        given = request.headers.get("X-Request-ID", "")
        request.environ["recoverybot.request_id"] = rid = (
            given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16])
        logs.start_request(rid)

    @app.after_request
    def headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Content-Security-Policy", policy)
        if "recoverybot.request_id" in request.environ:
            resp.headers["X-Request-ID"] = request.environ["recoverybot.request_id"]
        if request.path.startswith(("/enroll/", "/cancel/", "/lock/", "/chat/api/")):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    def wants_json() -> bool:
        return request.path.startswith(("/chat/api/", "/webhooks/", "/slack/")) or request.is_json

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify(error=exc.code, message=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # keep the exception's own headers, such as the Allow that a 405 must carry
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        if wants_json():
            message = (f"the request body may be at most {MAX_BODY // 1024} KiB" if exc.code == 413
                       else exc.description)
            return jsonify(error=exc.name.lower().replace(" ", "_"), message=message), exc.code, headers
        return (container.renderer.page("error", request_locale(container.renderer), status=exc.code),
                exc.code, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        if is_outage(exc):  # nothing was committed, so the client may simply send it again
            return unavailable(exc)
        # The route's pattern, not the path: /enroll/ and /cancel/ paths carry link tokens.
        route = request.url_rule.rule if request.url_rule is not None else "(no route)"
        log.exception("unhandled error on %s %s", request.method, route)
        if wants_json():
            return jsonify(error="internal_error", message="something went wrong; it was logged"), 500
        return container.renderer.page("error", request_locale(container.renderer), status=500), 500

    def unavailable(exc: Exception):
        log.warning("database unavailable on %s %s: %s", request.method,
                    request.url_rule.rule if request.url_rule is not None else "(no route)", driver_error(exc))
        headers = {"Retry-After": str(RETRY_AFTER)}
        if wants_json():
            return jsonify(error="unavailable", message=OUTAGE_MESSAGE), 503, headers
        return container.renderer.page("error", request_locale(container.renderer), status=503), 503, headers

    return app


def _slack_error(error: Exception, response):
    """Bolt catches what a listener raises and answers 500 itself; a database outage is a 503 (Slack shows
    the approver that the click failed, and they click again)."""
    from slack_bolt import BoltResponse

    if not is_outage(error):
        log.error("Slack listener failed", exc_info=error)
        return None
    log.warning("database unavailable in a Slack listener: %s", driver_error(error))
    if response is None:  # already acknowledged: nothing left to answer
        return None
    return BoltResponse(status=503, body='{"error": "unavailable", "message": "%s"}' % OUTAGE_MESSAGE,
                        headers={"Content-Type": "application/json", "Retry-After": str(RETRY_AFTER)})
