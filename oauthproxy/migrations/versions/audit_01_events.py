"""audit_events: the audit trail (issue 14)

Revision ID: audit_01_events
Revises: groups_01_grant_groups
Create Date: 2026-11-30 14:30:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "audit_01_events"
down_revision = "groups_01_grant_groups"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=True),
        sa.Column("user_email", sa.String(length=320), nullable=True),
        sa.Column("client_id", sa.String(length=512), nullable=True),
        sa.Column("route", sa.String(length=64), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("outcome", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.Column("tool", sa.String(length=255), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("details", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_time"), ["time"], unique=False)
        batch_op.create_index("ix_audit_events_user_id_time", ["user_id", "time"], unique=False)
        # Partial: tool calls, most of the rows, carry no email and cost this index nothing.
        batch_op.create_index(
            "ix_audit_events_user_email",
            ["user_email"],
            unique=False,
            sqlite_where=sa.text("user_email IS NOT NULL"),
            postgresql_where=sa.text("user_email IS NOT NULL"),
        )


def downgrade():
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_user_email")
        batch_op.drop_index("ix_audit_events_user_id_time")
        batch_op.drop_index(batch_op.f("ix_audit_events_time"))
    op.drop_table("audit_events")
