"""The composition root: the one place where settings choose each service's implementation."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bot import wakeup
from bot.chatwait import ChatWaiters
from bot.inbound import make_handler
from bot.instrument import MeteredSender, chat_channel, observe_sessions, timed_handler
from bot.mail import FolderMailer, SmtpMailer
from bot.metrics import DatabaseCollector, Metrics
from bot.retention_metrics import RetentionCollector
from bot.staff import ConsoleStaffNotifier
from bot.templates import Renderer
from bot.webchat import ChatRouter, WebChatSender, WebChatTranscript
from bot.worker import Worker
from recovery.app import Recovery
from recovery.clock import Clock
from recovery.config import Settings
from recovery.crypto import Keyring
from recovery.db import Database
from recovery.deps import Deps
from recovery.directory.embedded import EmbeddedDirectory
from recovery.outbox import MAX_ATTEMPTS, Dispatcher

log = logging.getLogger(__name__)


@dataclass
class Container:
    settings: Settings
    clock: Clock
    db: Database
    keyring: Keyring
    renderer: Renderer
    metrics: Metrics
    db_metrics: DatabaseCollector
    deps: Deps
    recovery: Recovery
    dispatcher: Dispatcher
    worker: Worker
    senders: dict = field(default_factory=dict)
    slack_app: object | None = None  # the Bolt app, when Slack is configured
    chat_waiters: ChatWaiters | None = None  # the web chat's waiting polls (bot/chatwait.py)
    closables: list = field(default_factory=list)  # clients holding connections, closed by close()

    def close(self) -> None:
        self.worker.stop()
        for closable in self.closables:
            closable.close()
        self.db.dispose()


def directory_factory(settings: Settings, keyring: Keyring, clock: Clock):
    if settings.ACCOUNT_DIRECTORY == "http":
        from recovery.directory.http import HttpDirectory

        shared = HttpDirectory(base_url=settings.ACCOUNT_API_URL, token=settings.ACCOUNT_API_TOKEN)
        return lambda session: shared
    return lambda session: EmbeddedDirectory(session, keyring=keyring, clock=clock)


def keyring_for(settings: Settings) -> Keyring:
    return Keyring(settings.secret_key(), settings.SECRET_KEY_PREVIOUS)


def build(settings: Settings, *, clock: Clock | None = None, db: Database | None = None) -> Container:
    clock = clock or Clock()
    db = db or Database(settings.DATABASE_URL)
    chat_waiters = ChatWaiters(db, listen=settings.WORKER_LISTEN)
    worker = None

    def committed(stored: set, chats: set) -> None:
        if chats:
            chat_waiters.written(chats)
        if stored and worker is not None:
            worker.stored(stored)

    # On PostgreSQL stored work NOTIFYs the worker processes; in this process a commit tells the worker
    # what it stored, and wakes the chat polls waiting for the messages it wrote.
    wakeup.install(db, committed)
    keyring = keyring_for(settings)
    renderer = Renderer(override_dir=settings.TEMPLATES_DIR or None,
                        globals={"brand_name": settings.BRAND_NAME, "support_email": settings.SUPPORT_EMAIL})
    metrics = Metrics()
    observe_sessions(db.sessions, metrics)
    metrics.registry.register(RetentionCollector(db, settings.retention(), clock))
    deps = Deps(policy=settings.policy, keyring=keyring, clock=clock,
                directory_for=directory_factory(settings, keyring, clock),
                public_base_url=settings.PUBLIC_BASE_URL,
                approver_ids=frozenset(settings.approver_ids()),
                security_approver_ids=frozenset(settings.security_approver_ids()),
                brand_name=settings.BRAND_NAME, chat_writers={"webchat": WebChatTranscript(renderer)})
    recovery = Recovery(db, deps)
    if settings.SMTP_URL:
        mailer = SmtpMailer(settings.SMTP_URL, mail_from=settings.MAIL_FROM, renderer=renderer)
    else:
        mailer = FolderMailer(settings.MAIL_OUTBOX_DIR, mail_from=settings.MAIL_FROM, renderer=renderer)
    senders = {
        "email": mailer,
        "chat": ChatRouter({"webchat": WebChatSender(db, renderer, clock)}),
        "staff": ConsoleStaffNotifier(),
    }
    slack_client = slack_decisions = None
    if settings.slack_enabled:
        from bot.slack.app import make_client
        from bot.slack.card import conversation_link
        from bot.slack.decisions import Decisions
        from bot.slack.notifier import ApproverMessages, SlackStaffNotifier

        slack_client = make_client(settings)
        slack_decisions = Decisions(deps=deps, renderer=renderer)
        senders["slack"] = ApproverMessages(slack_client)
        senders["staff"] = SlackStaffNotifier(db=db, deps=deps, renderer=renderer, client=slack_client,
                                              channel=settings.SLACK_APPROVAL_CHANNEL,
                                              security_ids=settings.SLACK_SECURITY_APPROVER_IDS,
                                              conversation_url=conversation_link(settings.SLACK_CONVERSATION_URL))
    intercom_inbound = None
    if settings.intercom_enabled:
        from bot.intercom.client import IntercomApi
        from bot.intercom.inbound import IntercomInbound
        from bot.intercom.sender import IntercomSender

        intercom_api = IntercomApi(token=settings.INTERCOM_ACCESS_TOKEN,
                                   base_url=settings.INTERCOM_API_BASE, admin_id=settings.INTERCOM_ADMIN_ID)
        senders["chat"].senders["intercom"] = IntercomSender(
            api=intercom_api, renderer=renderer, db=db, keyring=keyring, clock=clock,
            handover_team_id=settings.INTERCOM_HANDOVER_TEAM_ID)
        from bot.staff import StaffDirectory

        intercom_inbound = IntercomInbound(api=intercom_api, deps=deps,
                                           trust_external_id=settings.INTERCOM_IDENTITY_VERIFICATION,
                                           staff=StaffDirectory(mapping=settings.admin_approver_map(),
                                                                slack_client=slack_client))
    staff_channel = "slack" if settings.slack_enabled else "console"
    for kind, channel in (("email", "email"), ("chat", chat_channel), ("staff", staff_channel), ("slack", "slack")):
        if kind in senders:
            senders[kind] = MeteredSender(senders[kind], metrics, clock, channel=channel,
                                          max_attempts=MAX_ATTEMPTS)
    dispatcher = Dispatcher(db, keyring=keyring, senders=senders, clock=clock, metrics=metrics,
                            max_attempts=MAX_ATTEMPTS)
    handler = timed_handler(make_handler(deps, keyring, intercom=intercom_inbound, slack=slack_decisions), metrics,
                            clock.now)
    worker = Worker(db=db, recovery=recovery, dispatcher=dispatcher, handler=handler, clock=clock,
                    idle_sleep=settings.WORKER_IDLE_SECONDS, retention=settings.retention(),
                    listen=settings.WORKER_LISTEN)
    container = Container(settings=settings, clock=clock, db=db, keyring=keyring, renderer=renderer,
                          metrics=metrics, db_metrics=DatabaseCollector(db, clock, background=True), deps=deps,
                          recovery=recovery, dispatcher=dispatcher, worker=worker, senders=senders,
                          chat_waiters=chat_waiters)
    container.closables.append(chat_waiters)
    if intercom_inbound is not None:
        container.closables.append(intercom_api)
    if slack_client is not None:
        from bot.slack.app import build_app

        container.slack_app = build_app(container, slack_client)
    return container
