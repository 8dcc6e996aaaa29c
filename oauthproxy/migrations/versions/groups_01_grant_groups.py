"""grants.user_groups: the user's groups as the login provider states them (issue 14, groups)

Revision ID: groups_01_grant_groups
Revises: revocations_01
Create Date: 2026-12-01 09:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "groups_01_grant_groups"
down_revision = "revocations_01"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_groups", sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_column("user_groups")
