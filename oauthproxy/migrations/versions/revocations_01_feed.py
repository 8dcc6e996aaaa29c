"""revocations: recently revoked grants, read by the workers that poll for revocations (issue 14)

Revision ID: revocations_01
Revises: identity_01_signing_keys
Create Date: 2026-12-01 09:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "revocations_01"
down_revision = "identity_01_signing_keys"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "revocations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("grant_id", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revocations")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("revocations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_revocations_revoked_at"), ["revoked_at"], unique=False)


def downgrade():
    with op.batch_alter_table("revocations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_revocations_revoked_at"))
    op.drop_table("revocations")
