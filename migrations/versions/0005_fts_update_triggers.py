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

from backfill import baseline

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# (trigger, table, its FTS5 table, the indexed columns) as of this revision
TRIGGERS = (
    ("memories_fts_update", "memories", "memories_fts", ("title", "content", "tags")),
    ("entities_fts_update", "entities", "entities_fts", ("name", "description", "notes", "tags")),
)


def _narrow(trigger: str, table: str, fts: str, columns: tuple[str, ...]) -> str:
    cols = ", ".join(columns)
    old = ", ".join(f"old.{c}" for c in columns)
    new = ", ".join(f"new.{c}" for c in columns)
    return (
        f"CREATE TRIGGER {trigger} AFTER UPDATE OF {cols} ON {table} BEGIN\n"
        f"      INSERT INTO {fts}({fts}, rowid, {cols}) VALUES ('delete', old.id, {old});\n"
        f"      INSERT INTO {fts}(rowid, {cols}) VALUES (new.id, {new});\n"
        "    END"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for trigger, table, fts, columns in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(_narrow(trigger, table, fts, columns))


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    originals = {trigger: next(s for s in baseline.FTS if f" {trigger} " in s) for trigger, *_ in TRIGGERS}
    for trigger, *_ in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(originals[trigger])
