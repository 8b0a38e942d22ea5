"""backfill's own tables: jobs with their checkpoint, failed/skipped rows, per-row provenance

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

T, Int = sa.Text, sa.Integer
RowId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "backfill_jobs",
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("status", T, nullable=False),
        sa.Column("kind", T, nullable=False, server_default="run"),
        sa.Column("target", T, nullable=False),
        sa.Column("user_id", T),
        sa.Column("user_email", T),
        sa.Column("provider", T, nullable=False),
        sa.Column("model", T, nullable=False),
        sa.Column("dimensions", Int, nullable=False),
        sa.Column("recipe_version", T, nullable=False),
        sa.Column("batch_size", Int, nullable=False),
        sa.Column("params", T, nullable=False, server_default="{}"),
        sa.Column("cursors", T, nullable=False, server_default="{}"),
        *[sa.Column(n, Int, nullable=False, server_default="0")
          for n in ("selected", "embedded", "failed", "skipped", "batches", "requests", "tokens")],
        sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
        sa.Column("elapsed_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("worker_id", T),
        sa.Column("heartbeat_at", T),
        sa.Column("lease_expires_at", T),
        sa.Column("stop_reason", T),
        sa.Column("created_at", T, nullable=False),
        sa.Column("updated_at", T, nullable=False),
        sa.Column("finished_at", T),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_backfill_jobs_status", "backfill_jobs", ["status"])
    op.create_table(
        "backfill_failures",
        sa.Column("job_id", Int, sa.ForeignKey("backfill_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("target", T, primary_key=True),
        sa.Column("row_id", RowId, primary_key=True),
        sa.Column("kind", T, nullable=False),
        sa.Column("error", T, nullable=False),
        sa.Column("attempts", Int, nullable=False, server_default="1"),
        sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", T, nullable=False),
        sa.Column("updated_at", T, nullable=False),
    )
    op.create_index("ix_backfill_failures_open", "backfill_failures", ["job_id", "kind", "resolved"])
    op.create_table(
        "backfill_embeddings",
        sa.Column("target", T, primary_key=True),
        sa.Column("row_id", RowId, primary_key=True),
        sa.Column("provider", T, nullable=False),
        sa.Column("model", T, nullable=False),
        sa.Column("dimensions", Int, nullable=False),
        sa.Column("recipe_version", T, nullable=False),
        sa.Column("content_hash", T, nullable=False),
        sa.Column("job_id", Int),
        sa.Column("embedded_at", T, nullable=False),
    )
    op.create_index("ix_backfill_embeddings_model", "backfill_embeddings", ["target", "model"])


def downgrade() -> None:
    op.drop_table("backfill_embeddings")
    op.drop_table("backfill_failures")
    op.drop_table("backfill_jobs")
