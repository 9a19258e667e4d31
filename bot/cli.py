"""The `recoverybot` command line (listed in the README). click parses; `recovery/` decides."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import click

from bot.logs import configure as configure_logging
from recovery.errors import ConfigError, RecoveryError


def _settings():
    from recovery.config import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def _container(upgrade: bool = False, *, service: bool = False, check_keys: bool | None = None):
    from bot.wiring import build
    from recovery import db as dbmod

    settings = _settings()
    # long-running processes log at LOG_LEVEL; one-shot commands only say what went wrong
    configure_logging(settings.LOG_LEVEL if service else logging.WARNING, settings.LOG_FORMAT,
                      log_polls=settings.LOG_POLLS)
    if upgrade:
        before = _require_schema(settings.DATABASE_URL, allow_empty=True)
        dbmod.upgrade(settings.DATABASE_URL)
        after = dbmod.current_revision(settings.DATABASE_URL)
        if after != before:
            logging.getLogger(__name__).info("database schema upgraded from %s to %s", before or "nothing", after)
    else:
        _require_schema(settings.DATABASE_URL)
    container = build(settings)
    if service if check_keys is None else check_keys:
        _check_keys(container.settings, container.db, container.keyring, container.clock)
    return container


def _check_keys(settings, db, keyring, clock, *, warn: bool = True) -> None:
    """Refuse to start with keys that cannot read the database (rather than fail on every row later),
    and say when SECRET_KEY_PREVIOUS has outlived a finished rotation."""
    from recovery import keys

    with db.transaction() as s:
        unreadable = keys.unreadable_samples(s, keyring)
        left_over = warn and keys.previous_keys_left_over(s, keyring, clock.now())
    if unreadable:
        raise click.ClickException(_wrong_key(settings, unreadable))
    if left_over:
        logging.getLogger("recoverybot.keys").warning(left_over)


def _wrong_key(settings, unreadable: list[str]) -> str:
    which = "SECRET_KEY" if settings.SECRET_KEY else (
        f"SECRET_KEY is not set, so the embedded default's key file "
        f"({settings.sqlite_path().parent / '.recoverybot-secret'}) was used; it")
    previous = "no key in SECRET_KEY_PREVIOUS does either" if settings.SECRET_KEY_PREVIOUS else \
        "SECRET_KEY_PREVIOUS is empty"
    return (f"{which} does not decrypt the data in this database, and {previous} "
            f"(e.g. {', '.join(unreadable[:4])}). Set SECRET_KEY to the key the data was encrypted with, or, "
            "while rotating, list that key in SECRET_KEY_PREVIOUS.")


def _require_schema(url: str, *, allow_empty: bool = False) -> str | None:
    from recovery.db import current_revision

    try:
        rev = current_revision(url)
    except Exception as exc:  # noqa: BLE001 - report any connection problem plainly
        raise click.ClickException(f"cannot reach the database: {type(exc).__name__}: {exc}") from None
    if rev is None and not allow_empty:
        raise click.ClickException("the database has no schema yet: run `recoverybot db upgrade` first")
    return rev


@click.group()
def main():
    """Recovery Bot: 2FA support and recovery for a crypto exchange."""


# ---- running ---------------------------------------------------------------------------------------

@main.command()
@click.option("--demo/--no-demo", default=True, help="Load demo accounts when the embedded directory is empty.")
def serve(demo: bool):
    """Run web and worker in one process (the embedded default)."""
    from werkzeug.serving import make_server

    from bot.chatwait import SERVE_LIMIT
    from bot.startup import announce, freeze_heap
    from bot.web import create_app

    c = _container(upgrade=True, service=True)
    if demo and c.settings.ACCOUNT_DIRECTORY == "embedded":
        _load_demo_if_empty(c)
    app = create_app(c)
    server = make_server(c.settings.HOST, c.settings.PORT, app, threaded=True)
    c.chat_waiters.limit = SERVE_LIMIT  # a thread per request here, not gunicorn's fixed 8
    c.chat_waiters.watch_file = c.db.is_postgres  # SQLite: this process is its only writer
    freeze_heap()
    c.worker.beat()  # ready from the first request on: the worker thread's own first beat can come later
    thread = threading.Thread(target=c.worker.run_forever, name="worker", daemon=True)
    thread.start()
    _start_socket_mode(c)
    announce(c, "serve")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        c.worker.stop()
        thread.join(timeout=5)


@main.command()
@click.option("--workers", type=int, default=lambda: int(os.environ.get("WEB_CONCURRENCY", "2")), show_default="WEB_CONCURRENCY or 2")
def web(workers: int):
    """Run the web process under gunicorn (production).

    gunicorn's processes count their metrics into one folder (prometheus-client's multiprocess mode),
    so a scrape answered by any of them reports the sum over all of them.
    """
    import shutil
    import tempfile

    from gunicorn.app.base import BaseApplication

    from bot.logs import gunicorn_logconfig

    settings = _settings()
    _require_schema(settings.DATABASE_URL)
    # Set before anything imports prometheus_client (bot.wiring does), which reads it once.
    metrics_dir = tempfile.mkdtemp(prefix="recoverybot-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT, log_polls=settings.LOG_POLLS)
    from bot.wiring import keyring_for
    from recovery.clock import Clock
    from recovery.db import Database

    db = Database(settings.DATABASE_URL)
    try:
        _check_keys(settings, db, keyring_for(settings), Clock())
    finally:
        db.dispose()

    def child_exit(_server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, metrics_dir)

    class App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{settings.HOST}:{settings.PORT}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", 8)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", "-")
            self.cfg.set("logconfig_dict", gunicorn_logconfig(settings.LOG_LEVEL, settings.LOG_FORMAT))
            self.cfg.set("child_exit", child_exit)

        def load(self):
            from bot.startup import announce, freeze_heap
            from bot.web import create_app

            c = _container(service=True, check_keys=False)  # checked above, once
            app = create_app(c)
            freeze_heap()
            announce(c, "web")
            return app

    try:
        App().run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@main.command()
def worker():
    """Run the worker process: inbox, timers and outbox."""
    import signal

    from bot.metrics import Exposition, start_server
    from bot.startup import announce, freeze_heap

    c = _container(service=True)
    freeze_heap()
    signal.signal(signal.SIGTERM, lambda *_: c.worker.stop())
    _start_socket_mode(c)
    if c.settings.WORKER_METRICS_PORT:
        # This process's own counters; the database's numbers come from the web processes' /metrics.
        try:
            start_server(Exposition(c.metrics), host=c.settings.HOST, port=c.settings.WORKER_METRICS_PORT,
                         token=c.settings.METRICS_TOKEN, healthy=c.worker.healthy)
        except OSError as exc:  # the work matters more than its metrics: say so loudly and carry on
            logging.getLogger(__name__).error("worker metrics not served on %s:%s: %s", c.settings.HOST,
                                              c.settings.WORKER_METRICS_PORT, exc)
    announce(c, "worker")
    c.worker.run_forever()


def _start_socket_mode(c) -> None:
    """With SLACK_APP_TOKEN, Slack's clicks arrive over a websocket the bot opens (no public endpoint);
    `serve` and `worker` hold it, so `web` processes need not."""
    if c.settings.SLACK_APP_TOKEN and c.slack_app is not None:
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        SocketModeHandler(c.slack_app, c.settings.SLACK_APP_TOKEN).connect()
        logging.getLogger(__name__).info("Slack Socket Mode connected")


# ---- database and accounts --------------------------------------------------------------------------

@main.group()
def db():
    """Database schema."""


@db.command("upgrade")
def db_upgrade():
    """Create or upgrade the schema (safe to run again)."""
    from recovery import db as dbmod

    settings = _settings()
    try:
        dbmod.upgrade(settings.DATABASE_URL)
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"upgrade failed: {type(exc).__name__}: {exc}") from None
    click.echo(f"schema is at revision {dbmod.current_revision(settings.DATABASE_URL)}")


@main.group()
def accounts():
    """The embedded account directory."""


@accounts.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def accounts_import(file: Path):
    """Import accounts from FILE.json (format in docs/accounts.md)."""
    from recovery.directory.importer import load

    c = _embedded_container()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {file}: {exc}") from None
    try:
        records = load(text)
        counts = _upsert(c, records)
    except RecoveryError as exc:
        raise click.ClickException(f"{file}: {exc}; nothing was imported") from None
    click.echo(f"imported {len(records)} accounts ({counts['created']} created, {counts['updated']} updated)")


@main.command("demo-data")
def demo_data():
    """Load the demo accounts (alex, mei and sam @example.com)."""
    c = _embedded_container()
    counts = _load_demo(c)
    click.echo(f"demo accounts loaded ({counts['created']} created, {counts['updated']} updated): "
               "alex@example.com (low risk), mei@example.com (medium), sam@example.com (high)")


def _embedded_container():
    c = _container()
    if c.settings.ACCOUNT_DIRECTORY != "embedded":
        raise click.ClickException("accounts are kept by the exchange's backend (ACCOUNT_DIRECTORY=http)")
    return c


def _upsert(c, records) -> dict:
    """Upsert all records in one transaction; an email that another stored account owns raises
    ImportProblem naming the record, and nothing is kept."""
    from sqlalchemy import select

    from recovery.directory.embedded import EmbeddedDirectory
    from recovery.errors import ImportProblem
    from recovery.models import Account

    counts = {"created": 0, "updated": 0}
    with c.db.transaction() as s:
        directory = EmbeddedDirectory(s, keyring=c.keyring, clock=c.clock)
        for i, rec in enumerate(records):
            owner = s.scalar(select(Account.id).where(Account.email == rec["email"]))
            if owner is not None and owner != rec["id"]:
                raise ImportProblem(f"accounts[{i}].email", f"{rec['email']!r} already belongs to account {owner!r}")
            counts[directory.upsert(rec)] += 1
    return counts


def _load_demo(c) -> dict:
    from recovery.directory.demo import demo_accounts
    from recovery.directory.importer import validate

    records = [validate(json.loads(json.dumps(r, default=lambda d: d.isoformat())), f"demo[{i}]")
               for i, r in enumerate(demo_accounts(c.clock.now()))]
    return _upsert(c, records)


def _load_demo_if_empty(c) -> None:
    from sqlalchemy import func, select

    from recovery.models import Account

    with c.db.transaction() as s:
        empty = s.scalar(select(func.count(Account.id))) == 0
    if empty:
        _load_demo(c)
        click.echo("loaded demo accounts: alex@example.com, mei@example.com, sam@example.com")


# ---- cases --------------------------------------------------------------------------------------------

@main.group()
def cases():
    """Recovery cases, and local approvals while Slack is not configured."""


@cases.command("list")
@click.option("--state", help="Only cases in this state.")
@click.option("--limit", type=int, default=50, show_default=True)
def cases_list(state, limit):
    """List recent cases."""
    from sqlalchemy import select

    from recovery.models import Case

    c = _container()
    with c.db.transaction() as s:
        query = select(Case).order_by(Case.created_at.desc()).limit(limit)
        if state:
            query = query.where(Case.state == state)
        rows = s.scalars(query).all()
        if not rows:
            click.echo("no cases")
        for case in rows:
            click.echo(f"{case.id}  {case.state:<18} risk={case.risk_level or '-':<6} "
                       f"account={case.account_id or '-':<12} opened={case.created_at:%Y-%m-%d %H:%M}Z "
                       f"via {case.channel}")


@cases.command("show")
@click.argument("case_id")
def cases_show(case_id):
    """Show a case: state, checks, risk, approvals and the audit trail."""
    from sqlalchemy import select

    from recovery import audit, timers
    from recovery.cases import CaseService
    from recovery.models import Approval

    c = _container()
    with c.db.transaction() as s:
        svc = CaseService(s, c.deps)
        try:
            case = svc.get(case_id)
        except RecoveryError as exc:
            raise click.ClickException(str(exc)) from None
        profile = svc.directory.get(case.account_id) if case.account_id else None
        click.echo(f"case {case.id}: {case.state}" + (f" ({case.final_reason})" if case.final_reason else ""))
        if case.details_purged_at:
            click.echo(f"  personal details purged {case.details_purged_at:%Y-%m-%d %H:%M:%S}Z (retention)")
        click.echo(f"  account: {case.account_id or ('-' if case.details_purged_at else '(none matched)')}  "
                   f"email: {_mask(profile.email) if profile else '-'}")
        click.echo(f"  opened {case.created_at:%Y-%m-%d %H:%M:%S}Z by {case.opened_by} via {case.channel}")
        click.echo(f"  risk: {case.risk_level or '-'}" + (f" ({', '.join(case.risk_reasons)})" if case.risk_reasons else ""))
        click.echo("  checks:")
        for chk in svc.checks(case):
            click.echo(f"    {chk.name:<17} {chk.result:<13} {json.dumps(chk.evidence, ensure_ascii=False)}")
        approvals = s.scalars(select(Approval).where(Approval.case_id == case.id).order_by(Approval.at)).all()
        if approvals:
            click.echo("  decisions:")
            for a in approvals:
                click.echo(f"    {a.at:%Y-%m-%d %H:%M:%S}Z {a.approver} {a.decision}" + (f": {a.reason}" if a.reason else ""))
        pending = timers.pending(s, case.id)
        if pending:
            click.echo("  timers:")
            for t in pending:
                click.echo(f"    {t.kind:<20} due {t.due_at:%Y-%m-%d %H:%M:%S}Z")
        click.echo("  audit trail:")
        for rec in audit.trail(s, case.id):
            click.echo(f"    {rec.at:%Y-%m-%d %H:%M:%S}Z {rec.event:<17} {rec.from_state or '-'} -> "
                       f"{rec.to_state or '-'} by {rec.actor} ({rec.channel})" + (f": {rec.reason}" if rec.reason else ""))


def _mask(email: str) -> str:
    name, _, domain = email.partition("@")
    return f"{name[:1]}{'*' * max(1, len(name) - 1)}@{domain}"


def _decide(case_id, approver, decision, reason=None, code=None):
    c = _container()
    if c.settings.slack_enabled:
        raise click.ClickException("Slack approvals are configured; decide in Slack instead")
    try:
        case = c.recovery.decide(case_id, approver=approver, decision=decision, reason=reason,
                                 step_up_code=code, channel="cli")
    except RecoveryError as exc:
        raise click.ClickException(f"refused: {exc}") from None
    c.worker.drain()  # deliver the resulting emails and messages now
    with c.recovery.service() as svc:
        click.echo(f"case {case.id} is now {svc.get(case.id).state}")


@cases.command("approve")
@click.argument("case_id")
@click.option("--approver", required=True, help="Your approver name (LOCAL_APPROVERS).")
@click.option("--code", help="A current code from your own authenticator, when policy asks for step-up.")
def cases_approve(case_id, approver, code):
    """Approve a case as a local approver."""
    _decide(case_id, approver, "approve", code=code)


@cases.command("deny")
@click.argument("case_id")
@click.option("--approver", required=True)
@click.option("--reason", required=True, help="Why; the owner is told.")
def cases_deny(case_id, approver, reason):
    """Deny a case as a local approver."""
    _decide(case_id, approver, "deny", reason=reason)


# ---- audit, approvers, outbox ----------------------------------------------------------------------------

@main.group()
def audit():
    """The hash-chained audit log."""


@audit.command("verify")
def audit_verify():
    """Check every audit record against the chain; exit 1 at the first broken one."""
    from recovery import audit as auditmod

    c = _container()
    with c.db.transaction() as s:
        result = auditmod.verify(s)
    if result.ok:
        click.echo(f"audit log intact: {result.checked} records")
        return
    click.echo(f"audit log BROKEN at record {result.broken_id}: {result.problem} "
               f"({result.checked} records before it are intact)", err=True)
    sys.exit(1)


@main.group()
def approvers():
    """Approvers' own step-up authenticators."""


@approvers.command("enroll")
@click.argument("approver_id")
@click.option("--svg", type=click.Path(dir_okay=False, path_type=Path), help="Also write the QR code to this SVG file.")
@click.option("--code", help="Confirm with a code from the app (otherwise you are asked).")
def approvers_enroll(approver_id, svg, code):
    """Enroll APPROVER_ID's own TOTP for step-up approvals."""
    import segno

    from recovery import approvers as approvers_mod

    c = _container()
    secret = approvers_mod.new_secret()
    uri = approvers_mod.uri(secret, approver_id, c.settings.BRAND_NAME)
    qr = segno.make(uri, error="m")
    qr.terminal(compact=True)
    click.echo(f"setup key: {secret}")
    if svg:
        qr.save(str(svg), kind="svg", scale=5)
        click.echo(f"QR code written to {svg}")
    code = code or click.prompt("code shown by the app")
    try:
        approvers_mod.enroll(c.db, c.keyring, c.clock, approver_id, secret, code)
    except RecoveryError as exc:
        raise click.ClickException(f"not enrolled: {exc}") from None
    click.echo(f"{approver_id} enrolled for step-up approvals")


@main.group()
def outbox():
    """Outgoing messages: list dead ones and retry them."""


@outbox.command("list")
@click.option("--status", type=click.Choice(["pending", "sent", "dead"]), default="dead", show_default=True)
def outbox_list(status):
    from sqlalchemy import select

    from recovery.models import OutboxMessage

    c = _container()
    with c.db.transaction() as s:
        rows = s.scalars(select(OutboxMessage).where(OutboxMessage.status == status)
                         .order_by(OutboxMessage.id).limit(200)).all()
        if not rows:
            click.echo(f"no {status} messages")
        for m in rows:
            click.echo(f"{m.id}  {m.kind:<6} {m.idempotency_key}  attempts={m.attempts}  "
                       f"last_error={m.last_error or '-'}")


@outbox.command("retry")
@click.argument("message_id", required=False, type=int)
@click.option("--all", "all_", is_flag=True, help="Retry every dead message.")
def outbox_retry(message_id, all_):
    from recovery.outbox import retry_dead

    if not message_id and not all_:
        raise click.UsageError("give a MESSAGE_ID or --all")
    c = _container()
    with c.db.transaction() as s:
        n = retry_dead(s, None if all_ else message_id, c.clock.now())
    if n == 0:
        raise click.ClickException("no dead message with that id")
    click.echo(f"{n} message(s) queued again")


# ---- report --------------------------------------------------------------------------------------------

@main.command()
@click.option("--days", type=click.IntRange(1, 3660), default=14, show_default=True,
              help="Cases opened in the last N days.")
@click.option("--svg", type=click.Path(dir_okay=False, path_type=Path), help="Also draw the report as an SVG chart.")
def report(days, svg):
    """The funnel, where cases stopped, time to decision and to completion, and the queues now."""
    from datetime import timedelta

    from bot import report as reportmod
    from recovery import stats

    c = _container()
    now = c.clock.now()
    with c.db.reading() as s:
        data = stats.report(s, since=now - timedelta(days=days), until=now)
        queues = stats.queues(s, now)
    click.echo(reportmod.text(data, queues, now), nl=False)
    if svg:
        try:
            svg.write_text(reportmod.svg(data, queues, now, title=c.settings.BRAND_NAME), encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot write {svg}: {exc}") from None
        click.echo(f"chart written to {svg}")


# ---- retention, access requests and keys -------------------------------------------------------------

@main.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be removed, by kind and count.")
def purge(dry_run):
    """Remove personal data past its retention (RETENTION_DAYS_*); the worker also runs this daily."""
    from recovery import retention

    c = _container()
    policy = c.settings.retention()
    result = retention.purge(c.db, policy, c.clock.now(), trigger="cli", dry_run=dry_run)
    n = result.counts
    click.echo(f"{'would purge' if dry_run else 'purged'} (days kept: {policy.describe()}):")
    click.echo(f"  transcripts  {n['transcripts']:>6}  conversations ({result.chat_lines} web chat lines)")
    click.echo(f"  documents    {n['documents']:>6}")
    click.echo(f"  events       {n['events']:>6}  ({result.inbox} inbox, {result.outbox} outbox)")
    click.echo(f"  cases        {n['cases']:>6}  case details")


@main.command("export")
@click.option("--account", "account_id", required=True, help="The account's id in the account directory.")
def export(account_id):
    """Print everything the bot holds about an account as one JSON document (for an access request)."""
    from recovery.errors import DirectoryError
    from recovery.export import export_account

    c = _container()
    try:
        with c.db.transaction() as s:
            doc = export_account(s, account_id=account_id, keyring=c.keyring,
                                 directory=c.deps.directory_for(s), now=c.clock.now())
    except DirectoryError as exc:
        raise click.ClickException(f"the account directory failed: {exc}") from None
    if doc["account"] is None and not doc["cases"]:
        raise click.ClickException(f"no account {account_id!r} and no case of it")
    click.echo(json.dumps(doc, ensure_ascii=False, indent=2))


@main.group()
def keys():
    """The key that protects data at rest (SECRET_KEY, SECRET_KEY_PREVIOUS)."""


@keys.command("rotate")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=500, show_default=True,
              help="Rows per transaction.")
def keys_rotate(batch_size):
    """Re-encrypt every encrypted value under SECRET_KEY; safe to stop and run again."""
    from recovery import keys as keys_mod

    c = _container()
    _check_keys(c.settings, c.db, c.keyring, c.clock, warn=False)  # this run says itself what may go
    report = keys_mod.rotate(c.db, c.keyring, c.clock, batch=batch_size)
    for sealed in keys_mod.SEALED:
        click.echo(f"{sealed.name:<28} {report.rekeyed[sealed.name]:>7} re-encrypted, "
                   f"{report.current[sealed.name]:>7} already under SECRET_KEY")
    for value in report.live_keyed:
        click.echo(f"cannot re-key the {value.what} of case {value.case_id} (a keyed hash of a code that is never "
                   f"kept): it stays valid under the older key until {value.expires_at:%Y-%m-%d %H:%M:%S}Z")
    if not report.finished:
        shown = ", ".join(report.unreadable)
        more = report.unreadable_count - len(report.unreadable)
        raise click.ClickException(
            f"{report.unreadable_count} value(s) could not be decrypted with SECRET_KEY or any key in "
            f"SECRET_KEY_PREVIOUS: {shown}{f' and {more} more' if more > 0 else ''}. Add the key that encrypted "
            "them to SECRET_KEY_PREVIOUS and run `recoverybot keys rotate` again; keep SECRET_KEY_PREVIOUS "
            "until then.")
    until = report.old_key_needed_until
    if not c.keyring.has_previous:
        click.echo("everything is under SECRET_KEY (SECRET_KEY_PREVIOUS is not set)")
    elif until is not None:
        click.echo(f"everything else is under SECRET_KEY: SECRET_KEY_PREVIOUS may be removed after "
                   f"{until:%Y-%m-%d %H:%M:%S}Z, when the last of these has expired")
    else:
        click.echo("everything is under SECRET_KEY: SECRET_KEY_PREVIOUS may be removed now (then restart)")
