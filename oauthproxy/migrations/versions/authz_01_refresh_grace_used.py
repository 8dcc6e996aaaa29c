"""tokens.grace_used_at: the refresh grace window is honoured once per rotated token

Revision ID: authz_01_grace_used
Revises: 16efb1d20a01
Create Date: 2026-11-30 08:05:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'authz_01_grace_used'
down_revision = '16efb1d20a01'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('grace_used_at', sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table('tokens', schema=None) as batch_op:
        batch_op.drop_column('grace_used_at')
