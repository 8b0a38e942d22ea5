"""mcp-memory-ts baseline (server schema version 2)

On SQLite/libSQL this runs the server's own startup DDL (backfill/baseline.py), FTS5 included:
`entities` has `contact_info` and no `embedding` (revision 0006 adds it, as the server's script does).
On PostgreSQL it creates the tables the tool reads and writes, without FTS5.
A live database that already has these tables is adopted (`backfill migrate` stamps this
revision after checking the tables), never recreated.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from backfill import baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for statement in baseline.sqlite_statements():
            op.execute(statement)
    else:
        _create_portable()
    now = datetime.now(UTC).isoformat()
    # the server's startup records its one version (its migration runner reads the highest)
    op.execute(sa.text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)")
               .bindparams(v=baseline.SCHEMA_VERSION, t=now))


def _create_portable() -> None:
    T, Int = sa.Text, sa.Integer

    def fk():
        return sa.ForeignKey("users.id", ondelete="CASCADE")

    op.create_table(
        "users",
        sa.Column("id", T, primary_key=True),
        sa.Column("email", T, nullable=False, unique=True),
        sa.Column("name", T), sa.Column("organization", T), sa.Column("api_key_hash", T),
        sa.Column("oauth_provider", T), sa.Column("oauth_id", T),
        sa.Column("is_active", sa.Boolean, server_default=sa.true()),
        sa.Column("metadata", T),
        sa.Column("created_at", T, nullable=False), sa.Column("updated_at", T, nullable=False),
    )
    op.create_table(
        "entities",
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("user_id", T, fk()),
        sa.Column("name", T, nullable=False), sa.Column("entity_type", T, nullable=False),
        *[sa.Column(n, T) for n in ("person_type", "description", "company", "title", "email", "phone",
                                    "address", "website", "social_media", "notes")],
        sa.Column("importance", Int, server_default=sa.text("2")),
        sa.Column("tags", T), sa.Column("relationships", T), sa.Column("last_interaction", T),
        sa.Column("interaction_count", Int, server_default=sa.text("0")),
        sa.Column("metadata", T),
        sa.Column("created_at", T, nullable=False), sa.Column("updated_at", T, nullable=False),
        sa.Column("embedding", T),
    )
    op.create_table(
        "memories",
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("user_id", T, fk()),
        sa.Column("title", T, nullable=False), sa.Column("content", T, nullable=False),
        sa.Column("memory_type", T, nullable=False),
        sa.Column("importance", Int, server_default=sa.text("2")),
        sa.Column("tags", T), sa.Column("entity_ids", T), sa.Column("embedding", T), sa.Column("metadata", T),
        sa.Column("is_archived", sa.Boolean, server_default=sa.false()),
        sa.Column("created_at", T, nullable=False), sa.Column("updated_at", T, nullable=False),
    )
    op.create_table(
        "interactions",
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("user_id", T, fk()),
        sa.Column("user_prompt", T, nullable=False), sa.Column("assistant_response", T, nullable=False),
        sa.Column("context", T), sa.Column("feedback", T), sa.Column("sentiment", T), sa.Column("metadata", T),
        sa.Column("created_at", T, nullable=False), sa.Column("updated_at", T, nullable=False),
    )
    op.create_table(
        "schema_version",
        sa.Column("version", Int, primary_key=True, autoincrement=False),
        sa.Column("applied_at", T, nullable=False),
    )
    op.create_table(
        "api_usage_tracking",
        sa.Column("id", T, primary_key=True),
        sa.Column("user_id", T, fk(), nullable=False),
        sa.Column("api_provider", T, nullable=False), sa.Column("model", T, nullable=False),
        sa.Column("tokens_used", Int, nullable=False, server_default=sa.text("0")),
        sa.Column("cost_usd", sa.Float, nullable=False), sa.Column("operation_type", T, nullable=False),
        sa.Column("timestamp", sa.BigInteger, nullable=False), sa.Column("date", T, nullable=False),
        sa.Column("metadata", T),
        sa.CheckConstraint("api_provider IN ('openai', 'openrouter')", name="ck_api_usage_provider"),
    )
    op.create_index("idx_users_email", "users", ["email"])
    op.create_index("idx_users_api_key_hash", "users", ["api_key_hash"])
    op.create_index("idx_entities_user_type", "entities", ["user_id", "entity_type"])
    op.create_index("idx_entities_user_importance", "entities", ["user_id", sa.text("importance DESC")])
    op.create_index("idx_entities_user_created", "entities", ["user_id", sa.text("created_at DESC")])
    op.create_index("idx_memories_user_type", "memories", ["user_id", "memory_type"])
    op.create_index("idx_memories_user_importance", "memories", ["user_id", sa.text("importance DESC")])
    op.create_index("idx_memories_user_archived", "memories", ["user_id", "is_archived"])
    op.create_index("idx_memories_created", "memories", [sa.text("created_at DESC")])
    op.create_index("idx_memories_user_updated", "memories", ["user_id", sa.text("updated_at DESC")])
    op.create_index("idx_interactions_user_date", "interactions", ["user_id", sa.text("(substr(created_at, 1, 10))")])
    op.create_index("idx_usage_user_provider_date", "api_usage_tracking", ["user_id", "api_provider", "date"])


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in baseline.FTS_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        for name in baseline.FTS_TABLES:
            op.execute(f"DROP TABLE IF EXISTS {name}")
    for name in ("api_usage_tracking", "interactions", "memories", "entities", "schema_version", "users"):
        op.drop_table(name)
