"""Seeds years of finished work into a PostgreSQL database, with generate_series, for benchmarks/history.py.

Every table a web-chat message touches, or that sits beside one it touches, gets `rows` rows of
history that a real deployment piles up: closed cases with their audit records, idle conversations,
processed inbox events, sent outbox messages, fired and cancelled timers (cancelled ones keep
`fired_at` empty, and their due time has long passed), and chat transcripts. Nothing seeded is pending,
so the worker has exactly the same work to do before and after: only the history differs.

Row i is dated 20 days ago plus i seconds: a million rows fill the last 20 days, inside the default
retention (processed events are purged after 30 days), so the worker's daily purge leaves them alone,
as it would leave a busy deployment's last weeks.
"""
from __future__ import annotations

from sqlalchemy import text

# Rows are numbered from `start` so seeding can be resumed to grow the same database (1k, then 1M).
STATEMENTS = {
    "cases": """
        INSERT INTO cases (id, state, account_id, channel, conversation_id, opened_by, locale, risk_level,
                           risk_reasons, final_reason, code_failures, code_sends, link_failures, version,
                           created_at, updated_at, closed_at)
        SELECT 'hist' || lpad(i::text, 12, '0'),
               (ARRAY['completed','denied','rejected','cancelled','expired','locked'])[1 + i % 6],
               'acct-' || (i % 50000), 'webchat', 'webchat:hist' || i, 'customer', 'en', 'low',
               '[]', 'history', 0, 1, 0, 3,
               now() - interval '20 days' + i * interval '1 second',
               now() - interval '20 days' + i * interval '1 second' + interval '1 hour',
               now() - interval '20 days' + i * interval '1 second' + interval '1 hour'
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i""",
    "conversations": """
        INSERT INTO conversations (key, channel, locale, stage, case_id, data, created_at, updated_at)
        SELECT 'webchat:hist' || i, 'webchat', 'en', 'idle', 'hist' || lpad(i::text, 12, '0'), '{}',
               now() - interval '20 days' + i * interval '1 second',
               now() - interval '20 days' + i * interval '1 second' + interval '1 hour'
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i""",
    "audit_log": """
        INSERT INTO audit_log (id, case_id, event, from_state, to_state, actor, channel, reason, at,
                               prev_hash, hash)
        SELECT top.id + i - CAST(:start AS integer) + 1,
               'hist' || lpad(i::text, 12, '0'), 'start', NULL, 'opened', 'customer', 'webchat', NULL,
               now() - interval '20 days' + i * interval '1 second',
               md5((i - 1)::text) || md5((i - 1)::text), md5(i::text) || md5(i::text)
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i
        -- ids follow the newest record, as the audit chain numbers its own (from its head, not a sequence)
        CROSS JOIN (SELECT coalesce(max(id), 0) AS id FROM audit_log) AS top""",
    "inbox_events": """
        INSERT INTO inbox_events (delivery_key, source, conversation_key, payload, received_at,
                                  processed_at, attempts)
        SELECT 'webchat:hist' || i || ':' || md5(i::text), 'webchat', 'webchat:hist' || (i / 4),
               '{"text_enc": "x", "locale": "en"}',
               now() - interval '20 days' + i * interval '1 second',
               now() - interval '20 days' + i * interval '1 second' + interval '50 milliseconds', 0
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i""",
    "outbox": """
        INSERT INTO outbox (kind, idempotency_key, payload_enc, status, attempts, next_attempt_at,
                            created_at, sent_at, case_id, conversation_key)
        SELECT (ARRAY['email','chat','staff'])[1 + i % 3], 'hist:' || i, 'gAAAAA' || md5(i::text), 'sent', 1,
               now() - interval '20 days' + i * interval '1 second',
               now() - interval '20 days' + i * interval '1 second',
               now() - interval '20 days' + i * interval '1 second' + interval '1 second',
               'hist' || lpad(i::text, 12, '0'), 'webchat:hist' || i
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i""",
    "timers": """
        INSERT INTO timers (case_id, kind, due_at, fired_at, cancelled_at)
        SELECT 'hist' || lpad(i::text, 12, '0'), 'code_expiry',
               now() - interval '20 days' + i * interval '1 second' + interval '10 minutes',
               CASE WHEN i % 2 = 0 THEN now() - interval '20 days' + i * interval '1 second'
                                        + interval '10 minutes' END,
               CASE WHEN i % 2 = 1 THEN now() - interval '20 days' + i * interval '1 second' END
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i""",
    "chat_sessions": """
        INSERT INTO chat_sessions (id, locale, created_at)
        SELECT 'hist' || i, 'en', now() - interval '20 days' + i * interval '4 seconds'
        FROM generate_series(CAST(:start AS integer) / 4 + 1, CAST(:stop AS integer) / 4) AS i""",
    "chat_messages": """
        INSERT INTO chat_messages (session_id, sender, text, buttons, source_key, message_key, created_at)
        SELECT 'hist' || (1 + (i - 1) / 4), CASE WHEN i % 2 = 0 THEN 'bot' ELSE 'customer' END,
               'message ' || i, '[]', CASE WHEN i % 2 = 0 THEN 'webchat:hist' || i || ':' || '0' END,
               CASE WHEN i % 2 = 0 THEN 'faq_2fa' END,
               now() - interval '20 days' + i * interval '1 second'
        FROM generate_series(CAST(:start AS integer), CAST(:stop AS integer)) AS i""",
}

TABLES = tuple(STATEMENTS)


def seed(conn, start: int, stop: int) -> None:
    """Adds rows start..stop (inclusive) to every table, and points the audit head at the newest record
    so new records chain on from it. Runs in the caller's transaction."""
    if stop < start:
        return
    for sql in STATEMENTS.values():
        conn.execute(text(sql), {"start": start, "stop": stop})
    conn.execute(text("""
        INSERT INTO audit_head (id, last_id, last_hash)
        SELECT 1, id, hash FROM audit_log ORDER BY id DESC LIMIT 1
        ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, last_hash = excluded.last_hash"""))


def counts(conn) -> dict[str, int]:
    return {t: conn.scalar(text(f"SELECT count(*) FROM {t}")) for t in TABLES}
