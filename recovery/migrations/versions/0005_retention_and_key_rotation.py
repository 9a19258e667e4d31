"""retention and key rotation

- cases.closed_at (when the case reached a final state; retention counts from it), backfilled from
  updated_at for cases already final, and cases.details_purged_at;
- outbox.case_id and outbox.conversation_key (what a message belongs to). Older rows get their case id
  from the idempotency key ("RC-XXXXXXXX:..."); the rest count from when they were queued;
- purge_runs and key_rotations.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 09:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

FINAL = ('completed', 'denied', 'rejected', 'locked', 'cancelled', 'expired')
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('details_purged_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_cases_closed_at'), ['closed_at'], unique=False)
    cases = sa.table('cases', sa.column('state', sa.String), sa.column('updated_at', sa.DateTime(timezone=True)),
                     sa.column('closed_at', sa.DateTime(timezone=True)))
    op.execute(cases.update().where(cases.c.state.in_(FINAL)).values(closed_at=cases.c.updated_at))

    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('case_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('conversation_key', sa.String(length=200), nullable=True))
        batch_op.create_index(batch_op.f('ix_outbox_case_id'), ['case_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_conversation_key'), ['conversation_key'], unique=False)
    outbox = sa.table('outbox', sa.column('idempotency_key', sa.String), sa.column('case_id', sa.String))
    op.execute(outbox.update().where(outbox.c.idempotency_key.like('RC-%:%'))
               .values(case_id=sa.func.substr(outbox.c.idempotency_key, 1, 11)))

    op.create_table('purge_runs',
    sa.Column('id', BIG_ID, autoincrement=True, nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('transcripts', sa.Integer(), nullable=False),
    sa.Column('documents', sa.Integer(), nullable=False),
    sa.Column('events', sa.Integer(), nullable=False),
    sa.Column('cases', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('key_rotations',
    sa.Column('id', BIG_ID, autoincrement=True, nullable=False),
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('rekeyed', sa.BigInteger(), nullable=False),
    sa.Column('unreadable', sa.BigInteger(), nullable=False),
    sa.Column('old_key_needed_until', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('key_rotations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_key_rotations_key_id'), ['key_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('key_rotations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_key_rotations_key_id'))
    op.drop_table('key_rotations')
    op.drop_table('purge_runs')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_conversation_key'))
        batch_op.drop_index(batch_op.f('ix_outbox_case_id'))
        batch_op.drop_column('conversation_key')
        batch_op.drop_column('case_id')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cases_closed_at'))
        batch_op.drop_column('details_purged_at')
        batch_op.drop_column('closed_at')
