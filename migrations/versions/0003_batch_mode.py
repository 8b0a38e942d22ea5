"""Batch API mode: the JSONL files / remote batches of a job and their request lines

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

T, Int = sa.Text, sa.Integer


def upgrade() -> None:
    op.create_table(
        "backfill_batches",
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("job_id", Int, sa.ForeignKey("backfill_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", T, nullable=False, unique=True),
        sa.Column("state", T, nullable=False),
        sa.Column("lines", Int, nullable=False, server_default="0"),
        sa.Column("rows", Int, nullable=False, server_default="0"),
        *[sa.Column(n, T) for n in ("input_file_id", "remote_batch_id", "remote_status", "output_file_id",
                                    "error_file_id", "upload_started_at", "submit_started_at", "error")],
        sa.Column("submits", Int, nullable=False, server_default="0"),
        sa.Column("created_at", T, nullable=False),
        sa.Column("updated_at", T, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_backfill_batches_job_state", "backfill_batches", ["job_id", "state"])
    op.create_table(
        "backfill_batch_chunks",
        sa.Column("id", Int, primary_key=True, autoincrement=True),
        sa.Column("batch_id", Int, sa.ForeignKey("backfill_batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("custom_id", T, nullable=False, unique=True),
        sa.Column("target", T, nullable=False),
        sa.Column("row_ids", T, nullable=False),
        sa.Column("content_hashes", T),
        sa.Column("tokens", Int, nullable=False, server_default="0"),
        sa.Column("state", T, nullable=False),
        sa.Column("created_at", T, nullable=False),
        sa.Column("updated_at", T, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_backfill_batch_chunks_batch_state", "backfill_batch_chunks", ["batch_id", "state"])


def downgrade() -> None:
    op.drop_table("backfill_batch_chunks")
    op.drop_table("backfill_batches")
