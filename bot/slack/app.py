"""The slack-bolt app: approve/deny buttons, their modals, and `/recovery`.

It only translates: a click becomes a modal (or an ephemeral refusal); a submission becomes an inbox event
that the worker decides (bot/slack/decisions.py). Who may act is decided from the request's user and team, and the case is always
re-read from the database by the message the button is on; the button's value is never trusted.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from sqlalchemy import select

from bot.slack import card, views
from bot.slack.decisions import Decisions
from bot.slack.views import APPROVE_VIEW, DENY_VIEW, as_dict, form_values
from recovery import audit
from recovery.cases import initiators
from recovery.db import driver_error, is_outage
from recovery.errors import NotFound
from recovery.machine import State
from recovery.models import Case, Conversation, SlackCard

log = logging.getLogger(__name__)
# The work after a click's ack (reading the case, views.open) runs on a pool of this many threads; the
# ack itself is answered in the request's own thread (process_before_response). Each views.open
# waits on Slack (0.1-0.3 s), and gunicorn's processes do not share a burst evenly, so one process can
# get 35 of 50 clicks: with Bolt's default 5 threads, the modals of a burst would open up to 2 s late,
# close to the trigger_id's 3 s life (see docs/performance.md). The work holds a database connection
# only briefly, never while calling Slack.
LISTENER_THREADS = 64
# views.open errors that a new click can get past: a fresh trigger_id, or a moment later
RETRYABLE_OPEN_ERRORS = frozenset({"expired_trigger_id", "invalid_trigger_id", "exchanged_trigger_id", "ratelimited"})


def make_client(settings) -> WebClient:
    # slack_sdk has no base-URL setting of its own and does not retry 429 unless told to.
    return WebClient(token=settings.SLACK_BOT_TOKEN, base_url=settings.SLACK_API_URL,
                     retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=3)])


class Approvals:
    """The listeners, with what they need; registered on a Bolt App by `register`."""

    def __init__(self, container, client: WebClient, acks_first: AcksFirst, after_ack: ThreadPoolExecutor):
        self.c, self.client = container, client
        self.after_ack = after_ack
        self.decisions = Decisions(deps=container.deps, renderer=container.renderer)
        self.acks_first = acks_first
        self.approvers = set(container.settings.SLACK_APPROVER_IDS)
        self.security = set(container.settings.SLACK_SECURITY_APPROVER_IDS)
        self._team_id = container.settings.SLACK_TEAM_ID or None
        self.enterprise_id = container.settings.SLACK_ENTERPRISE_ID or None

    # ---- who is acting ----------------------------------------------------------------------------

    def team_id(self) -> str:
        if self._team_id is None:
            self._team_id = self.client.auth_test()["team_id"]  # our own workspace, learned once
        return self._team_id

    def refusal(self, body: dict) -> str | None:
        """Why this request may not act, or None. Every workspace id the payload carries must be ours:
        in a channel shared through Slack Connect, `team.id` is ours while the clicking user's
        `user.team_id` is their own workspace's, and a listed id from another workspace is someone else."""
        user = as_dict(body.get("user"))
        teams = [as_dict(body.get("team")).get("id"), user.get("team_id"), body.get("team_id")]
        teams = [t for t in teams if t]
        if not teams or any(t != self.team_id() for t in teams):
            return "other_team"
        if self.enterprise_id is not None:
            enterprise = body.get("enterprise")
            orgs = [enterprise if isinstance(enterprise, str) else as_dict(enterprise).get("id"),
                    body.get("enterprise_id"), user.get("enterprise_id")]
            orgs = [o for o in orgs if o]
            if not orgs or any(o != self.enterprise_id for o in orgs):
                return "other_team"
        if _user_id(body) not in self.approvers | self.security:
            return "not_authorized"
        return None

    def _refuse(self, body: dict, reason: str, case: Case | None, channel_id: str | None, **extra) -> None:
        user = _user_id(body) or "?"
        team = as_dict(body.get("team")).get("id") or body.get("team_id") or "?"
        if case is not None:
            with self.c.recovery.service() as svc:
                audit.append(svc.s, case_id=case.id, event="approval_refused", from_state=case.state,
                             to_state=case.state, actor=f"slack:{team}:{user}", channel="slack", reason=reason,
                             at=svc.now)
        if channel_id and user != "?":
            text = views.refusal_text(self.c.renderer, reason, state=extra.get("state", ""),
                                      message=extra.get("message", ""))
            self.client.chat_postEphemeral(channel=channel_id, user=user, text=text)

    def click_context(self, body: dict) -> tuple[Case | None, set[str], str]:
        """What a click needs from the database, in one query of one read-only transaction (no write
        lock on SQLite, no commit): the case the card is on, who may not decide on it, and the owner's
        masked address for the modal. The case is found by the message the button is on."""
        container = as_dict(body.get("container"))
        channel = as_dict(body.get("channel")).get("id") or container.get("channel_id")
        ts = as_dict(body.get("message")).get("ts") or container.get("message_ts")
        if not channel or not ts:
            return None, set(), "-"
        with self.c.db.reading() as s:
            row = s.execute(select(Case, Conversation).join(SlackCard, SlackCard.case_id == Case.id)
                            .outerjoin(Conversation, Conversation.key == Case.conversation_id)
                            .where(SlackCard.channel == channel, SlackCard.message_ts == ts)).first()
            if row is None:
                return None, set(), "-"
            case, conv = row
            found = case, initiators(s, case, conv), views.masked_email(self.c.deps, s, case)
            s.expunge(case)  # keeps its loaded state through the read-only transaction's rollback
            return found

    # ---- buttons ------------------------------------------------------------------------------------

    def on_click(self, ack, body, action):
        """Answers the click at once, in the request's thread, and leaves the rest to the pool.

        Not a Bolt lazy listener: Bolt deep-copies the whole request for one before it answers, 0.3 of
        the 2.3 ms of CPU a click's request thread took. Nothing else holds this body."""
        ack()
        self._after_answer("a Slack click", self._open_after_acks, body, action, time.monotonic())

    def _after_answer(self, what: str, work, *args) -> None:
        """Run `work(*args)` on the pool once the request is answered. With process_before_response anything
        still running in the listener holds the answer back, and a failure there would turn it into a 500;
        here nothing is left to answer, so a failure is only logged (the approver clicks again)."""
        def run():
            try:
                work(*args)
            except Exception as exc:  # noqa: BLE001 - answered already
                _log_failure(f"{what} after its answer", exc)

        try:
            self.after_ack.submit(run)
        except RuntimeError as exc:  # the pool is shut down: the process is stopping; the answer stands
            _log_failure(f"{what} while stopping", exc)

    def _open_after_acks(self, body, action, acked_at: float) -> None:
        self.acks_first.wait(since=acked_at)  # the wait counts from the ack, not from a free pool thread
        self.on_button(body, action)

    def on_button(self, body, action):
        channel_id = as_dict(body.get("channel")).get("id")
        reason = self.refusal(body)
        if reason:
            self._refuse(body, reason, self.click_context(body)[0], channel_id)
            return
        case, initiators_, masked = self.click_context(body)
        if case is None:
            self._refuse(body, "unknown", None, channel_id, message="This card is not linked to a case.")
            return
        if _user_id(body) in initiators_:
            # refused at the click, so the initiator never gets a modal (the domain refuses a submission too)
            self._refuse(body, "initiator", case, channel_id)
            return
        if case.state != State.AWAITING_APPROVAL:
            self._refuse(body, "closed", case, channel_id, state=case.state)
            return
        if not body.get("trigger_id"):
            self._refuse(body, "unknown", case, channel_id, message="This click carried no trigger; please click again.")
            return
        deciding = action.get("action_id") == card.APPROVE
        try:
            self.client.views_open(trigger_id=body["trigger_id"], view=views.decision_modal(
                self.c.renderer, self.c.deps, case, approve=deciding, channel_id=channel_id, masked=masked))
        except SlackApiError as exc:
            # Only Slack's own refusal (HTTP 200, ok: false) says for certain that no form is open; a
            # gateway's 5xx might follow a form that did open. Without a word the button would seem to do
            # nothing. Clicking again helps with a trigger that expired (a click answered late) or a rate
            # limit, not with a refusal of the app itself (a missing scope, a revoked token).
            error = exc.response.get("error") if exc.response.status_code == 200 else None
            if channel_id and error:
                text = self.c.renderer.block(card.TEMPLATE, "form_failed", dict(
                    case_id=case.id, approve=deciding, error=error, retry=error in RETRYABLE_OPEN_ERRORS))
                self.client.chat_postEphemeral(channel=channel_id, user=_user_id(body), text=text)
            raise

    # ---- modal submissions -----------------------------------------------------------------------------

    def on_submit(self, ack, body, view):
        """Check what the form can show, store the submission, answer with "recording…"; the worker decides
        (bot/slack/decisions.py) and tells the approver the outcome in the card's channel."""
        case_id, _, channel_id = (view.get("private_metadata") or "").partition("|")
        values = form_values(view)
        reason = self.refusal(body)
        if reason:
            field = next((f for f in ("totp", "reason") if f in values), None)
            ack(response_action="errors", errors={field: "You may not decide on this case."}) if field else ack()
            self._after_answer("a refused Slack submission", self._refuse_submission, body, reason, case_id,
                               channel_id or None)
            return
        approve = view.get("callback_id") == views.APPROVE_VIEW
        if self.decisions.unusable(case_id, view, _user_id(body)):
            ack(response_action="update", view=views.message_view(
                self.c.renderer, approve=approve, block="refused",
                context=dict(reason="unknown", message="This form is not linked to a case; nothing was changed.")))
            return
        errors = self.decisions.form_error(values, approve=approve)
        if errors and all(field in values for field in errors):
            ack(response_action="errors", errors=errors)
            return
        stored = self.decisions.store(self.c.db, view=view, case_id=case_id, channel_id=channel_id,
                                      user=_user_id(body), approve=approve, values=values, now=self.c.clock.now())
        self.c.metrics.inbox("slack", "stored" if stored else "duplicate")
        # stored on a plain connection, which no session hook sees: wake this process's worker (under
        # `recoverybot serve`); on PostgreSQL the others hear the NOTIFY inside the statement
        self.c.worker.wake()
        ack(response_action="update", view=self.decisions.recording_view(case_id, channel_id, approve=approve))

    def _refuse_submission(self, body: dict, reason: str, case_id: str, channel_id: str | None) -> None:
        case = self._case_or_none(case_id)
        if case is not None:
            self._refuse(body, reason, case, channel_id)

    def _case_or_none(self, case_id: str) -> Case | None:
        with self.c.recovery.service() as svc:
            try:
                return svc.get(case_id)
            except NotFound:
                return None

    # ---- /recovery -------------------------------------------------------------------------------------

    def on_command(self, ack, body, command):
        if self.refusal(body):
            ack(text="Only 2FA-reset approvers may use /recovery.")
            return
        ack(text=self.lookup((command.get("text") or "").strip()))

    def lookup(self, query: str) -> str:
        with self.c.recovery.service() as svc:
            now = svc.now
            if not query or query == "pending":
                rows = svc.s.scalars(select(Case).where(Case.state == State.AWAITING_APPROVAL.value)
                                     .order_by(Case.created_at).limit(30)).all()
                if not rows:
                    return "No cases are waiting for approval."
                return "Waiting for approval:\n" + "\n".join(
                    f"• `{c.id}` {c.risk_level} risk, waiting {_age(now - c.updated_at)}" for c in rows)
            if query.upper().startswith("RC-"):
                try:
                    case = svc.get(query.upper())
                except NotFound:
                    return f"No case {card.escape(query)}."
                return _describe(case, now)
            if "@" in query:
                profile = svc.directory.find_by_email(query)
                if profile is None:
                    return "No account has that email."
                rows = svc.s.scalars(select(Case).where(Case.account_id == profile.id)
                                     .order_by(Case.created_at.desc()).limit(10)).all()
                return "\n".join(_describe(c, now) for c in rows) or "That account has no recovery cases."
            return self.c.renderer.block(card.TEMPLATE, "slash_help", {})


def _user_id(body: dict) -> str | None:
    user_id = as_dict(body.get("user")).get("id") or body.get("user_id")
    return user_id if isinstance(user_id, str) and user_id else None


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _describe(case: Case, now) -> str:
    reason = f" ({card.escape(case.final_reason)})" if case.final_reason else ""
    return (f"`{case.id}` {case.state.replace('_', ' ')}, {case.risk_level or '-'} risk, opened "
            f"{_age(now - case.created_at)} ago{reason}")


def bolt_logger() -> logging.Logger:
    """The base logger handed to Bolt, pinned at WARNING.

    On a failed signature Bolt logs the whole request body (customer data) at INFO. Quieting the
    "slack_bolt" logger is not enough: without a base logger, each Bolt component copies the root
    logger's level at construction (INFO under `recoverybot serve`), and that own level wins over
    its parent's. With a base logger, every component copies this one's level instead.
    """
    logger = logging.getLogger("bot.slack.bolt")
    logger.setLevel(logging.WARNING)
    return logger


def _log_failure(what: str, exc: Exception) -> None:
    if is_outage(exc):
        log.warning("database unavailable in %s: %s", what, driver_error(exc))
    else:
        log.error("%s failed", what, exc_info=exc)


class AcksFirst:
    """Requests of this process still waiting for their ack, so that work done after an ack (reading the
    case, opening the modal) can let them go first.

    A burst of clicks otherwise shares the interpreter between acks and the earlier clicks' modals, and
    the acks, which Slack times, come out last. The count alone is not enough: gunicorn holds the requests
    its threads have not taken yet where this process cannot count them, and the count touches zero each
    time its threads are between two requests. So the work also waits until no request has come in for
    `quiet` seconds; a request of the same burst comes in well within that. A modal waits at most `limit`
    seconds from its click's ack, far inside the trigger_id's 3 s."""

    def __init__(self, limit: float = 0.5, quiet: float = 0.05):
        self.limit, self.quiet = limit, quiet
        self.pending, self.last_start = 0, float("-inf")
        self.changed = threading.Condition()

    @contextmanager
    def request(self):
        with self.changed:
            self.pending += 1
            self.last_start = time.monotonic()
        try:
            yield
        finally:
            with self.changed:
                self.pending -= 1
                if not self.pending:
                    self.changed.notify_all()

    def wait(self, since: float | None = None) -> None:
        """Returns once the acks have gone, or `limit` seconds after `since` (a monotonic time; now if None)."""
        deadline = (time.monotonic() if since is None else since) + self.limit
        with self.changed:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return
                if self.pending:
                    self.changed.wait(deadline - now)
                    continue
                idle = now - self.last_start
                if idle >= self.quiet:
                    return
                self.changed.wait(min(self.quiet - idle, deadline - now))


class _App(App):
    def __init__(self, *args, acks_first: AcksFirst, **kwargs):
        super().__init__(*args, **kwargs)
        self.acks_first = acks_first

    def dispatch(self, req):
        # Bolt's dispatch returns once the listener has acked (a click's work runs on in the pool)
        with self.acks_first.request():
            return super().dispatch(req)


def build_app(container, client: WebClient) -> App:
    settings = container.settings
    logging.getLogger("slack_bolt").setLevel(logging.WARNING)
    # Verification stays on even in Socket Mode, whose requests Bolt itself exempts; the HTTP route
    # is only mounted when there is a signing secret to check (bot/web.py).
    # process_before_response: a listener runs in the request's thread, and the response goes out as soon
    # as it returns. By default Bolt hands each request to a pool thread and polls for its ack every
    # 10 ms; under a burst the acks then queue for pool threads and for the poll. A submission and a
    # command answer once they are done anyway; a click acks and leaves the rest to the pool.
    acks_first = AcksFirst()
    pool = ThreadPoolExecutor(max_workers=LISTENER_THREADS, thread_name_prefix="slack-listener")
    app = _App(client=client, signing_secret=settings.SLACK_SIGNING_SECRET.strip(), logger=bolt_logger(),
               acks_first=acks_first, process_before_response=True,
               token_verification_enabled=False, ssl_check_enabled=False, url_verification_enabled=True,
               request_verification_enabled=True, listener_executor=pool)
    approvals = Approvals(container, client, acks_first, after_ack=pool)
    app.action(card.APPROVE)(approvals.on_click)
    app.action(card.DENY)(approvals.on_click)
    app.view(APPROVE_VIEW)(approvals.on_submit)
    app.view(DENY_VIEW)(approvals.on_submit)
    app.command("/recovery")(approvals.on_command)
    app.approvals = approvals  # for tests and the benchmark
    return app
