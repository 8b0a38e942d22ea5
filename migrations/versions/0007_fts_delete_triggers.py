"""FTS5 delete triggers: remove a deleted row's words with the 'delete' command

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

The server's `memories_fts_delete` and `entities_fts_delete` run `DELETE FROM <fts> WHERE rowid =
old.id` AFTER the row is gone. On an external-content table FTS5 reads the words to remove from the
content table, finds no row, and removes nothing: measured on a database the server made, a deleted
memory's words still MATCH and FTS5's `integrity-check` reports "database disk image is malformed".
Both are replaced by the form the FTS5 documentation gives (backfill/fts.py), which passes the old
values. Words left by deletes made before this revision stay until an FTS5 'rebuild' (README).

SQLite/libSQL only. Downgrade restores the server's triggers.
"""
from alembic import op

from backfill import baseline, fts

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _has_table(name: str) -> bool:
    row = op.get_bind().exec_driver_sql(f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{name}'")
    return row.first() is not None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, fts_table, columns in fts.TABLES:
        if not _has_table(fts_table):
            continue
        op.execute(f"DROP TRIGGER IF EXISTS {table}_fts_delete")
        op.execute(fts.delete_trigger(table, fts_table, columns))


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, fts_table, _columns in fts.TABLES:
        if not _has_table(fts_table):
            continue
        trigger = f"{table}_fts_delete"
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(next(s for s in baseline.FTS if f" {trigger} " in s))
