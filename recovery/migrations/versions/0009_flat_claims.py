"""partial indexes for the queue claims, so their cost does not grow with processed history

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 23:30:00

The inbox, timers and outbox keep every row they ever held. The indexes the claims used covered all of
them, and the planner walked past processed rows (the inbox claim by primary key, the timers claim
sequentially, since a cancelled timer keeps `fired_at` empty). Each index here holds only the rows still
waiting, so a claim reads a few index entries however long the history is. The predicates have no
parameters, so they also hold for the generic plans PostgreSQL uses for prepared statements.
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

PENDING_EVENT = 'processed_at IS NULL'
OPEN_TIMER = 'fired_at IS NULL AND cancelled_at IS NULL'
PENDING_MESSAGE = "status = 'pending'"


def _where(clause: str) -> dict:
    return {'postgresql_where': sa.text(clause), 'sqlite_where': sa.text(clause)}


def upgrade() -> None:
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.drop_index('ix_inbox_pending')
        batch_op.create_index('ix_inbox_pending_id', ['id'], unique=False, **_where(PENDING_EVENT))
        batch_op.create_index('ix_inbox_pending_conversation', ['conversation_key', 'id'], unique=False,
                              **_where(PENDING_EVENT))
    with op.batch_alter_table('timers', schema=None) as batch_op:
        batch_op.drop_index('ix_timers_due')
        batch_op.create_index('ix_timers_open_due', ['due_at', 'id'], unique=False, **_where(OPEN_TIMER))
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_ready')
        batch_op.create_index('ix_outbox_pending_id', ['id'], unique=False, **_where(PENDING_MESSAGE))


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_pending_id')
        batch_op.create_index('ix_outbox_ready', ['status', 'next_attempt_at'], unique=False)
    with op.batch_alter_table('timers', schema=None) as batch_op:
        batch_op.drop_index('ix_timers_open_due')
        batch_op.create_index('ix_timers_due', ['fired_at', 'due_at'], unique=False)
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.drop_index('ix_inbox_pending_conversation')
        batch_op.drop_index('ix_inbox_pending_id')
        batch_op.create_index('ix_inbox_pending', ['processed_at', 'id'], unique=False)
