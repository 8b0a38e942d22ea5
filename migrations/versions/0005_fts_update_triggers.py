"""FTS5 update triggers: fire only when an indexed column changes, and delete the old tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

The server's `memories_fts_update` and `entities_fts_update` are `AFTER UPDATE ON <table>` with no
column list, so every write of an embedding (or of importance, updated_at, ...) deleted and
re-inserted the row's full-text entry: a backfill at 1536 dimensions spent three quarters of its
database time re-indexing text that had not changed. They also deleted with
`DELETE FROM <fts> WHERE rowid = old.id`, which on an external-content table removes the tokens of
the row as it is *now*: after an edit of the content, the old words stayed searchable.

Both triggers are replaced by the form the FTS5 documentation gives for external-content tables:
`AFTER UPDATE OF <indexed columns>`, removing the old values with the 'delete' command. The index
ends up the same for every update that can happen, and embedding writes no longer touch it. Words
left behind by edits made before this revision stay until an FTS5 'rebuild' (see the README).

SQLite/libSQL only; PostgreSQL has no FTS5 tables. Downgrade restores the server's triggers.
"""
from alembic import op

from backfill import baseline, fts

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _has(kind: str, name: str) -> bool:
    row = op.get_bind().exec_driver_sql(f"SELECT 1 FROM sqlite_master WHERE type = '{kind}' AND name = '{name}'")
    return row.first() is not None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, fts_table, columns in fts.TABLES:
        if not _has("table", fts_table):  # a database without the server's FTS: no trigger to fix
            continue
        op.execute(f"DROP TRIGGER IF EXISTS {table}_fts_update")
        op.execute(fts.update_trigger(table, fts_table, columns))


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, fts_table, _columns in fts.TABLES:
        if not _has("table", fts_table):
            continue
        trigger = f"{table}_fts_update"
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(next(s for s in baseline.FTS if f" {trigger} " in s))
