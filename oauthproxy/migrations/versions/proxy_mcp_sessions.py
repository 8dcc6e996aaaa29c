"""mcp_sessions: which user opened each MCP session (issue 16)

Revision ID: proxy_mcp_sessions
Revises: reliability_refresh_lease
Create Date: 2026-11-30 08:30:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'proxy_mcp_sessions'
down_revision = 'reliability_refresh_lease'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('mcp_sessions',
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key_hash', name=op.f('pk_mcp_sessions'))
    )
    with op.batch_alter_table('mcp_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mcp_sessions_last_seen_at'), ['last_seen_at'], unique=False)


def downgrade():
    with op.batch_alter_table('mcp_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mcp_sessions_last_seen_at'))
    op.drop_table('mcp_sessions')
