"""case documents: slack upload marker

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:12:03.118204
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('case_documents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('slack_claim', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('slack_file_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('case_documents', schema=None) as batch_op:
        batch_op.drop_column('slack_file_id')
        batch_op.drop_column('slack_claim')
