"""owner safety: factor replaced only on confirmation, hold end, pending recovery codes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 04:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('factor_case_id', sa.String(length=32), nullable=True))
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hold_until', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('link_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending_codes_enc', sa.Text(), nullable=True))
    with op.batch_alter_table('chat_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('message_key', sa.String(length=48), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('chat_messages', schema=None) as batch_op:
        batch_op.drop_column('message_key')
    with op.batch_alter_table('link_tokens', schema=None) as batch_op:
        batch_op.drop_column('pending_codes_enc')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_column('hold_until')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_column('factor_case_id')
