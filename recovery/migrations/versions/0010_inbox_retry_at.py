"""inbox events failed by an unavailable service wait before their next attempt

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 07:55:00

An event whose handling failed because another service (the account API) did not answer was retried at
once, so a few seconds of outage used up all its attempts and the customer's message was never answered.
`retry_at` holds it back for a while after such a failure; NULL (every existing row) means "now".
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.drop_column('retry_at')
