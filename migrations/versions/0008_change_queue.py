"""change queue: backfill_changes, backfill_change_seeds, and the triggers that fill the queue

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

A row of `memories` or `entities` inserted, deleted, or updated in a column its recipe reads or in
`embedding` is queued in `backfill_changes` by a `backfill_`-named trigger, in the same transaction as
the write (SQLite/libSQL: triggers with an INSERT ... WHERE NOT EXISTS; PostgreSQL: one plpgsql function,
INSERT ... ON CONFLICT DO NOTHING). A run then reads the queue instead of the table (backfill/changes.py).
The queue starts unseeded: the first run scans the table once and marks it in `backfill_change_seeds`.
Downgrade drops the triggers, the function and both tables.
"""
import sqlalchemy as sa
from alembic import op

from backfill import changes

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_changes",
        sa.Column("target", sa.Text, primary_key=True),
        sa.Column("row_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("queued_at", sa.Text),
    )
    op.create_table(
        "backfill_change_seeds",
        sa.Column("target", sa.Text, primary_key=True),
        sa.Column("seeded_at", sa.Text, nullable=False),
        sa.Column("dimensions", sa.Integer),
    )
    changes.install(op.get_bind())


def downgrade() -> None:
    changes.uninstall(op.get_bind())
    op.drop_table("backfill_change_seeds")
    op.drop_table("backfill_changes")
