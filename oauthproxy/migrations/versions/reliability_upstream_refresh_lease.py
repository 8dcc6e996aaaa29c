"""grants: a lease on refreshing the upstream token, so no database lock is held across the provider call

Revision ID: reliability_refresh_lease
Revises: authz_01_grace_used
Create Date: 2026-11-30 08:10:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'reliability_refresh_lease'
down_revision = 'authz_01_grace_used'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('upstream_refresh_claim', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('upstream_refresh_claimed_until', sa.DateTime(), nullable=True))


def downgrade():
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.drop_column('upstream_refresh_claimed_until')
        batch_op.drop_column('upstream_refresh_claim')
