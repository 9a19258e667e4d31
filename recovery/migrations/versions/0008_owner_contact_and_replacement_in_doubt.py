"""owner contact kept on the case; a factor replacement in doubt

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-02 06:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_contact_enc', sa.Text(), nullable=True))
    with op.batch_alter_table('link_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replace_in_doubt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('replace_step', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('link_tokens', schema=None) as batch_op:
        batch_op.drop_column('replace_step')
        batch_op.drop_column('replace_in_doubt_at')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_column('owner_contact_enc')
