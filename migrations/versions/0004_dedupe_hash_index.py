"""same-text dedupe: index provenance by content hash; count the tokens a job saved

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-27
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backfill_jobs") as batch:
        batch.add_column(sa.Column("tokens_saved", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_backfill_embeddings_hash", "backfill_embeddings", ["target", "content_hash"])


def downgrade() -> None:
    op.drop_index("ix_backfill_embeddings_hash", table_name="backfill_embeddings")
    with op.batch_alter_table("backfill_jobs") as batch:
        batch.drop_column("tokens_saved")
