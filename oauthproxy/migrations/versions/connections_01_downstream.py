"""downstream connections: per-user credentials for routes with `oauth` or `user_api_key` (issue 13)

Revision ID: connections_01
Revises: proxy_mcp_sessions
Create Date: 2026-11-30 13:12:39

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "connections_01"
down_revision = "proxy_mcp_sessions"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "downstream_connections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("refresh_token", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("provider", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("refused_at", sa.DateTime(), nullable=True),
        sa.Column("refresh_claim", sa.String(length=32), nullable=True),
        sa.Column("refresh_claimed_until", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_downstream_connections")),
        sa.UniqueConstraint("user_id", "route", name=op.f("uq_downstream_connections_user_id")),
    )
    with op.batch_alter_table("downstream_connections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_downstream_connections_route"), ["route"], unique=False)

    op.create_table(
        "downstream_registrations",
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=2048), nullable=False),
        sa.Column("client_id", sa.String(length=2048), nullable=False),
        sa.Column("client_secret", sa.Text(), nullable=True),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key_hash", name=op.f("pk_downstream_registrations")),
    )
    op.create_table(
        "pending_connections",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_binding_hash", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("client_id", sa.String(length=2048), nullable=False),
        sa.Column("login", sa.Text(), nullable=False),
        sa.Column("secrets", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name=op.f("pk_pending_connections")),
    )
    with op.batch_alter_table("pending_connections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pending_connections_expires_at"), ["expires_at"], unique=False)

    with op.batch_alter_table("pending_authorizations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purpose", sa.String(length=16), server_default="authorize", nullable=False))


def downgrade():
    with op.batch_alter_table("pending_authorizations", schema=None) as batch_op:
        batch_op.drop_column("purpose")

    with op.batch_alter_table("pending_connections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pending_connections_expires_at"))

    op.drop_table("pending_connections")
    op.drop_table("downstream_registrations")
    with op.batch_alter_table("downstream_connections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_downstream_connections_route"))

    op.drop_table("downstream_connections")
