"""A teammate starts a recovery for a customer from Intercom, and so can never approve it (issue 7).

Everything runs against the local Intercom and Slack servers: the teammate's `!recovery start` is a signed
`conversation.admin.noted` webhook, the customer's messages are signed `conversation.user.*` webhooks, the
teammate is found in Slack with users.lookupByEmail (or the INTERCOM_ADMIN_SLACK_IDS mapping), and the
approvals are real Slack clicks and the real CLI.
"""
from __future__ import annotations

from click.testing import CliRunner

from bot.cli import main as cli_main
from recovery.models import Case, Conversation
from tests.conftest import SECRET
from tests.helpers import get_case, pass_checks
from tests.intercom_api import OTHER_ADMIN_ID, admin_note, settings_for
from tests.test_intercom import Customer, post
from tests.test_security import ALEX, approvals, load_demo, manual_clock
from tests.test_slack import ALICE, BOB, refusals, rig, slack  # noqa: F401 - fixtures
from tests.test_slack import intercom  # noqa: F401 - fixture

AGENT_EMAIL = "agent@exchange.test"


def note(r, conversation: str, text: str, n: int, **who) -> None:
    resp = post(r.server, admin_note(text, conversation=conversation, part=f"{conversation}9{n:02d}", **who))
    assert resp.status_code == 200 and resp.json()["status"] == "stored", resp.text
    r.drain()


def notes(intercom, conversation: str) -> list[str]:
    from bot.intercom.parse import html_to_text
    return [html_to_text(c.body["body"]) for c in intercom.replies(conversation, message_types=("note",))]


def case_of(c, conversation: str) -> Case | None:
    with c.db.transaction() as s:
        conv = s.get(Conversation, f"intercom:{conversation}")
        return s.get(Case, conv.case_id) if conv and conv.case_id else None


def test_a_teammate_who_starts_a_case_is_its_initiator_and_is_refused_in_slack(any_db_url, rig, intercom):
    """`!recovery start` makes the bot ask the customer for their email; the case records the teammate, found
    in Slack by their Intercom email, as initiator. Their Approve click and a forged submission are refused
    and audited, and another approver decides."""
    r = rig(any_db_url, **settings_for(intercom))
    r.fake.users[AGENT_EMAIL] = ALICE
    conversation = "147000000501"
    customer = Customer(r.server, intercom, conversation)
    customer.say("hi, my phone with the authenticator was stolen")
    r.drain()
    note(r, conversation, "!recovery start", 1)
    assert "email address" in intercom.reply_texts(conversation)[-1]
    assert any(ALICE in n and "initiator" in n for n in notes(intercom, conversation))
    assert [call["email"] for call in r.fake.named("users.lookupByEmail")] == [AGENT_EMAIL]

    customer.say(ALEX)
    r.drain()
    case = case_of(r.c, conversation)
    assert case.opened_by == ALICE and case.state == "verifying"
    pass_checks(r.c, case.id)

    r.click(case.id, ALICE)
    r.fake.wait_for("chat.postEphemeral")
    assert "someone else must decide" in r.ephemerals(ALICE)[-1]
    assert r.fake.named("views.open") == []
    r.submit(r.modal(case.id, BOB), ALICE)  # a submission forged from another approver's modal
    r.fake.wait_for("chat.postEphemeral", 2)
    assert approvals(r.c, case.id) == [] and get_case(r.c, case.id).state == "awaiting_approval"
    assert [reason for _, reason in refusals(r.c, case.id)] == ["initiator", "initiator"]

    r.approve(case.id, BOB)
    assert get_case(r.c, case.id).state == "approved"
    assert [a.approver for a in approvals(r.c, case.id)] == [BOB]


def test_a_start_with_an_address_opens_the_case_at_once_and_the_cli_refuses_its_initiator(sqlite_url, live,
                                                                                            intercom):
    """Without Slack, INTERCOM_ADMIN_SLACK_IDS maps the teammate to a local approver; `!recovery start <email>`
    opens the case straight away, the customer is told a code went to the address on file, and
    `recoverybot cases approve` refuses that approver while another may decide."""
    server = live(sqlite_url, worker=False, clock=manual_clock(),
                  **settings_for(intercom, INTERCOM_ADMIN_SLACK_IDS=f"{OTHER_ADMIN_ID}=bob"))
    load_demo(server.container)

    class Drain:
        def __init__(self, server):
            self.server, self.c = server, server.container

        def drain(self):
            self.c.worker.drain()

    r = Drain(server)
    conversation = "147000000502"
    Customer(server, intercom, conversation).say("I can't log in, lost my 2FA")
    r.drain()
    note(r, conversation, f"!recovery start {ALEX}", 1)
    case = case_of(r.c, conversation)
    assert case.opened_by == "bob" and case.state == "verifying"
    assert "6-digit verification code" in intercom.reply_texts(conversation)[-1]
    assert any(case.id in n and "can't approve it" in n for n in notes(intercom, conversation))
    note(r, conversation, "!recovery start", 2)  # a second start while the first is open
    assert "already has an open case" in notes(intercom, conversation)[-1]
    assert case_of(r.c, conversation).id == case.id

    pass_checks(r.c, case.id)
    env = {"DATABASE_URL": sqlite_url, "SECRET_KEY": SECRET, "MAIL_OUTBOX_DIR": r.c.settings.MAIL_OUTBOX_DIR,
           "SLACK_BOT_TOKEN": None, "SLACK_APP_TOKEN": None, "SMTP_URL": None, "RISK_POLICY": None,
           "LOG_LEVEL": "WARNING", **settings_for(intercom, INTERCOM_ADMIN_SLACK_IDS=f"{OTHER_ADMIN_ID}=bob")}
    refused = CliRunner().invoke(cli_main, ["cases", "approve", case.id, "--approver", "bob"], env=env)
    assert refused.exit_code != 0 and "someone else must decide" in refused.output
    assert approvals(r.c, case.id) == []
    done = CliRunner().invoke(cli_main, ["cases", "approve", case.id, "--approver", "alice"], env=env)
    assert done.exit_code == 0, done.output
    assert [a.approver for a in approvals(r.c, case.id)] == ["alice"]
    assert get_case(r.c, case.id).state == "link_sent"  # low risk: no notice window


def test_a_teammate_who_cannot_be_matched_to_an_approver_starts_nothing(sqlite_url, rig, intercom):
    """A teammate neither mapped nor found in Slack gets a note saying why, and no case or customer message
    follows; our own admin's notes and ordinary notes are ignored."""
    r = rig(sqlite_url, **settings_for(intercom))
    conversation = "147000000503"
    Customer(r.server, intercom, conversation).say("help, lost my authenticator")
    r.drain()
    before = intercom.reply_texts(conversation)
    note(r, conversation, "!recovery start alex@example.com", 1, admin_email="stranger@elsewhere.test")
    assert "can't match you to an approver" in notes(intercom, conversation)[-1]
    assert case_of(r.c, conversation) is None and intercom.reply_texts(conversation) == before
    for text, who in (("customer seems legit", {}), ("!recovery start", {"admin_id": "7654321"})):
        resp = post(r.server, admin_note(text, conversation=conversation, part=f"{conversation}977", **who))
        assert resp.json()["status"] == "ignored"


def test_a_teammate_stays_the_initiator_of_every_case_their_start_leads_to(sqlite_url, live, intercom):
    """A teammate starts with a mistyped address and the customer switches to the right one: the new case is
    theirs too, and `cases approve` refuses them on it, as on the first."""
    server = live(sqlite_url, worker=False, clock=manual_clock(),
                  **settings_for(intercom, INTERCOM_ADMIN_SLACK_IDS=f"{OTHER_ADMIN_ID}=bob"))
    load_demo(server.container)
    c = server.container
    conversation = "147000000504"
    customer = Customer(server, intercom, conversation)
    customer.say("please help, lost my authenticator")
    c.worker.drain()

    class Drain:
        def __init__(self):
            self.server, self.c = server, c

        def drain(self):
            c.worker.drain()

    note(Drain(), conversation, "!recovery start typo@nowhere.test", 1)
    first = case_of(c, conversation)
    for text in ("Use a different email", ALEX):
        customer.say(text)
        c.worker.drain()
    second = case_of(c, conversation)
    assert second.id != first.id and second.account_id == "acct-1001"
    pass_checks(c, second.id)
    env = {"DATABASE_URL": sqlite_url, "SECRET_KEY": SECRET, "MAIL_OUTBOX_DIR": c.settings.MAIL_OUTBOX_DIR,
           "SLACK_BOT_TOKEN": None, "SLACK_APP_TOKEN": None, "SMTP_URL": None, "RISK_POLICY": None,
           "LOG_LEVEL": "WARNING", **settings_for(intercom, INTERCOM_ADMIN_SLACK_IDS=f"{OTHER_ADMIN_ID}=bob")}
    refused = CliRunner().invoke(cli_main, ["cases", "approve", second.id, "--approver", "bob"], env=env)
    assert refused.exit_code != 0 and "someone else must decide" in refused.output
    assert approvals(c, second.id) == []
