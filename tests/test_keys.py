"""Key rotation (issue 11): `recoverybot keys rotate` moves every encrypted value to SECRET_KEY while the
bot runs on SECRET_KEY plus SECRET_KEY_PREVIOUS, a case in flight finishes after the old key is gone, and
a wrong or missing key is a clear error naming the variable."""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyotp
from sqlalchemy import MetaData, select

from recovery.crypto import Keyring, UnreadableValue
from recovery.directory.embedded import EmbeddedDirectory
from recovery.keys import SEALED, tokens
from tests.conftest import SECRET, ChatClient, code_in, link_in
from tests.helpers import account, awaiting_case, get_case, last_mail, load_accounts, open_case
from tests.slack_api import SIGNING_SECRET, FakeSlack
from tests.test_cli import cli, ok, refused  # noqa: F401 - the `cli` fixture
from tests.test_security import ALEX, MEI, enroll_approver, fresh_code, load_demo, manual_clock, setup_over_http
from tests.test_slack import ALICE, CAROL, CHANNEL, Rig, add_document, slack  # noqa: F401 - the `slack` fixture

OLD_KEY = "old-key-that-someone-who-left-knew-0123456789"
NEW_KEY = "new-key-after-the-rotation-abcdefghij-0123456789"
STRANGER_KEY = "a-key-that-never-encrypted-anything-here-0123"
KIM = "kim@example.com"
BIN = Path(sys.executable).parent / "recoverybot"


def slack_settings(fake: FakeSlack) -> dict:
    """Slack approvals, with a step-up code from the approver's own authenticator even on low risk."""
    return dict(SLACK_BOT_TOKEN="xoxb-test-token", SLACK_SIGNING_SECRET=SIGNING_SECRET,
                SLACK_APPROVAL_CHANNEL=CHANNEL, SLACK_APPROVER_IDS=ALICE, SLACK_SECURITY_APPROVER_IDS=CAROL,
                SLACK_API_URL=fake.url, RISK_POLICY='{"levels": {"low": {"step_up": true}}}')


def sealed_values(c) -> dict[tuple, str]:
    """Every encrypted value in the database, by (column, row, position)."""
    meta = MetaData()
    meta.reflect(bind=c.db.engine)
    encrypted = {f"{t.name}.{col.name}" for t in meta.sorted_tables for col in t.c if col.name.endswith("_enc")}
    assert encrypted <= {s.name for s in SEALED}, "an encrypted column that `keys rotate` would miss"
    out = {}
    with c.db.transaction() as s:
        for sealed in SEALED:
            for pk, value in s.execute(select(sealed.pk, sealed.attr).where(sealed.attr.is_not(None))):
                for i, token in enumerate(tokens(sealed, value)):
                    out[(sealed.name, pk, i)] = token
    return out


def start_link(c, case_id: str, password: str):
    """The customer opens the emailed link and gives the password: the page now holds a new secret
    (encrypted at rest) and the browser a cookie. Returns the browser, the link and the setup key."""
    link = link_in(last_mail(c, "enroll_link", case_id), "enroll")
    browser, key = setup_over_http(link, password)
    return browser, link, key


def confirm_link(c, case_id: str, browser, link: str, key: str) -> None:
    """The customer confirms a code from the new app, and the case completes."""
    done = browser.post(link, data={"step": "confirm", "code": pyotp.TOTP(key).at(c.clock.now())}, timeout=10)
    assert done.status_code == 200, done.text
    c.worker.drain()
    assert get_case(c, case_id).state == "completed"


def approve_to_link(c, case_id: str, app) -> None:
    c.recovery.decide(case_id, approver=ALICE, decision="approve", step_up_code=fresh_code(c, app))
    c.worker.drain()  # the 0 h notice window: reset, hold, link


def test_rotation_keeps_a_case_in_flight_working(any_db_url, live, make_container, slack, cli):
    """Rotate while one case waits for approval, one for its email code and one on its open enroll page:
    every value moves to the new key, `keys rotate` names the live code it cannot re-key and says when the
    old key may go; the code still verifies, and with the old key removed the waiting case finishes
    through HTTP, with an approver's step-up code whose secret was encrypted under the old key, and so
    does the open enroll page."""
    clock = manual_clock()
    old = live(any_db_url, worker=False, clock=clock, SECRET_KEY=OLD_KEY, **slack_settings(slack))
    c = old.container
    load_demo(c, alex_password=True)
    load_accounts(c, [account("acct-2002", KIM)])
    with c.db.transaction() as s:  # an account that set up its authenticator: its TOTP secret is encrypted too
        EmbeddedDirectory(s, keyring=c.keyring, clock=c.clock).replace_factor(
            "acct-1003", secret=pyotp.random_base32(), step=1, recovery_code_hashes=[], case_id="RC-EARLIER0")
    alice = enroll_approver(c, ALICE)
    started = awaiting_case(c, KIM)  # its enroll page is open: the new secret waits, encrypted, with the link
    approve_to_link(c, started, alice)
    kim_page = start_link(c, started, "pw-acct-2002")
    waiting = awaiting_case(c, ALEX)
    add_document(c, waiting, "passport.jpg")
    verifying = open_case(c, MEI)
    mei_code = code_in(last_mail(c, "verification_code", verifying))
    chat = ChatClient(old.url)
    chat.say("what is 2fa?")  # stored encrypted; answered only after the rotation
    before = sealed_values(c)
    assert {name for name, _, _ in before} == {"outbox.payload_enc", "approvers.totp_secret_enc",
                                               "accounts.totp_secret_enc", "case_documents.content_enc",
                                               "inbox_events.payload", "link_tokens.pending_secret_enc",
                                               "link_tokens.pending_codes_enc", "cases.owner_contact_enc"}
    plain = {k: Keyring(OLD_KEY).decrypt(v) for k, v in before.items()}

    both = {"SECRET_KEY": NEW_KEY, "SECRET_KEY_PREVIOUS": OLD_KEY}
    out = ok(cli("keys", "rotate", "--batch-size", "3", db_url=any_db_url, **both))
    assert re.search(r"^outbox\.payload_enc +(\d+) re-encrypted, +0 already", out, re.M).group(1) == str(
        sum(1 for name, _, _ in before if name == "outbox.payload_enc"))
    assert f"cannot re-key the email code of case {verifying}" in out
    assert "SECRET_KEY_PREVIOUS may be removed after" in out and waiting not in out
    after = sealed_values(c)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    new_only = Keyring(NEW_KEY)
    assert {k: new_only.decrypt(v) for k, v in after.items()} == plain

    again = ok(cli("keys", "rotate", db_url=any_db_url, **both))  # resumable: nothing is done twice
    assert re.findall(r"(\d+) re-encrypted", again) == ["0"] * len(SEALED)
    assert sealed_values(c) == after

    during = make_container(any_db_url, clock=clock, **both, **slack_settings(slack))
    with during.recovery.service() as svc:  # keyed under the old key, the code still verifies
        assert svc.submit_code(verifying, mei_code).status == "ok"
    assert "SECRET_KEY_PREVIOUS may be removed now" in ok(cli("keys", "rotate", db_url=any_db_url, **both))

    new = live(any_db_url, worker=False, clock=clock, SECRET_KEY=NEW_KEY, **slack_settings(slack))
    rig = Rig(new, slack)
    view = rig.modal(waiting, ALICE)
    assert any(b.get("block_id") == "totp" for b in view["blocks"])
    assert rig.submit(view, ALICE, code=fresh_code(new.container, alice)).decided
    rig.drain()  # approved, the 0 h notice window, the link; and the chat message stored under the old key
    assert get_case(new.container, waiting).state == "link_sent"
    confirm_link(new.container, waiting, *start_link(new.container, waiting, "correct horse battery"))
    browser, link, key = kim_page  # opened before the rotation, on the server that ran on the old key alone
    confirm_link(new.container, started, browser, link.replace(old.url, new.url), key)
    assert any(m["sender"] == "bot" and "authenticator" in m["text"].lower() for m in chat.poll())


def test_a_wrong_or_missing_key_is_named_and_changes_nothing(any_db_url, make_container, cli, tmp_path):
    """`keys rotate` and the services refuse keys that cannot read the data, naming SECRET_KEY and
    SECRET_KEY_PREVIOUS, without a traceback and without changing a value; a bad SECRET_KEY_PREVIOUS is a
    configuration error naming it."""
    c = make_container(any_db_url)
    load_demo(c)
    enroll_approver(c, "carol")
    open_case(c, ALEX)
    before = sealed_values(c)

    refused(cli("keys", "rotate", db_url=any_db_url, SECRET_KEY=STRANGER_KEY),
            "SECRET_KEY does not decrypt the data in this database", "SECRET_KEY_PREVIOUS is empty",
            "outbox.payload_enc #1")
    refused(cli("keys", "rotate", db_url=any_db_url, SECRET_KEY=NEW_KEY, SECRET_KEY_PREVIOUS=STRANGER_KEY),
            "SECRET_KEY does not decrypt", "no key in SECRET_KEY_PREVIOUS does either")
    if any_db_url.startswith("sqlite"):  # no SECRET_KEY: the embedded default makes a key file, a new key
        refused(cli("keys", "rotate", db_url=any_db_url, SECRET_KEY=None), "SECRET_KEY is not set",
                str(tmp_path / ".recoverybot-secret"), "does not decrypt")
    else:
        refused(cli("keys", "rotate", db_url=any_db_url, SECRET_KEY=None), "configuration error",
                "SECRET_KEY is required")
    refused(cli("keys", "rotate", db_url=any_db_url, SECRET_KEY_PREVIOUS=f"{NEW_KEY},short"),
            "configuration error", "SECRET_KEY_PREVIOUS: key 2 of 2 is shorter than 32 characters")
    refused(cli("keys", "rotate", db_url=any_db_url, SECRET_KEY_PREVIOUS=SECRET),
            "configuration error", "SECRET_KEY_PREVIOUS: key 1 is SECRET_KEY itself")
    for command in ("worker", "web") if any_db_url.startswith("sqlite") else ():  # the same check on both
        run = subprocess.run([str(BIN), command], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                             env=_env(DATABASE_URL=any_db_url, SECRET_KEY=STRANGER_KEY))
        assert run.returncode != 0 and "SECRET_KEY does not decrypt" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert sealed_values(c) == before
    try:
        Keyring(STRANGER_KEY).decrypt(next(iter(before.values())))
        raise AssertionError("a stranger key decrypted the data")
    except UnreadableValue as exc:
        assert "SECRET_KEY_PREVIOUS" in str(exc)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLACK_", "INTERCOM_", "DATABASE_URL", "SMTP_", "SECRET_KEY", "RETENTION_"))}
    return env | {"LOG_LEVEL": "INFO", "WORKER_IDLE_SECONDS": "0.05"} | extra


def _output_until(proc: subprocess.Popen, marker: str, timeout: float = 30) -> str:
    """What the process printed up to the line holding `marker` (or until it exits or time runs out)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            return "".join(seen)
        seen.append(line)
        if marker in line:
            return "".join(seen)


def test_services_warn_while_previous_keys_outlive_a_finished_rotation(sqlite_url, make_container, cli, tmp_path):
    """After `keys rotate` has finished, a worker started with SECRET_KEY_PREVIOUS still set warns that it
    can be removed; without it, the warning is gone."""
    c = make_container(sqlite_url, SECRET_KEY=OLD_KEY)
    load_demo(c)
    enroll_approver(c, "carol")
    both = {"SECRET_KEY": NEW_KEY, "SECRET_KEY_PREVIOUS": OLD_KEY}
    assert "may be removed now" in ok(cli("keys", "rotate", db_url=sqlite_url, **both))
    for env, warned in ((both, True), ({"SECRET_KEY": NEW_KEY}, False)):
        proc = subprocess.Popen([str(BIN), "worker"], cwd=tmp_path, env=_env(DATABASE_URL=sqlite_url, **env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output = _output_until(proc, "worker started")
        finally:
            proc.terminate()
            proc.wait(10)
        assert "worker started" in output, output
        assert ("SECRET_KEY_PREVIOUS is still set, but `recoverybot keys rotate` finished" in output) == warned, output
