"""The FTS5 triggers the tool keeps correct on the server's external-content tables.

The server's `*_fts_update` and `*_fts_delete` triggers remove a row's words with
`DELETE FROM <fts> WHERE rowid = old.id`. On an external-content table FTS5 then reads the words to
remove from the content table as it is *now*: after an edit it removes the new words (the old ones
stay searchable), after a delete it finds no row (the deleted words stay searchable), and FTS5's
`integrity-check` reports the index "malformed". The update trigger also fired on every UPDATE, so
each embedding write re-indexed its row's text.

These are the forms the FTS5 documentation gives for external-content tables: the `'delete'` command
with the old values, and an update trigger that fires only when an indexed column changes.
Revision 0005 installs the update triggers, 0007 the delete triggers; `migrate` puts them back if
the server re-creates its own (it does so only with IF NOT EXISTS, after a drop).
"""

from __future__ import annotations

# (table, its FTS5 table, the indexed columns): the server's FTS tables
TABLES = (
    ("memories", "memories_fts", ("title", "content", "tags")),
    ("entities", "entities_fts", ("name", "description", "notes", "tags")),
)


def _delete_old(fts: str, columns: tuple[str, ...]) -> str:
    cols = ", ".join(columns)
    old = ", ".join(f"old.{c}" for c in columns)
    return f"INSERT INTO {fts}({fts}, rowid, {cols}) VALUES ('delete', old.id, {old});"


def update_trigger(table: str, fts: str, columns: tuple[str, ...]) -> str:
    cols = ", ".join(columns)
    new = ", ".join(f"new.{c}" for c in columns)
    return (
        f"CREATE TRIGGER {table}_fts_update AFTER UPDATE OF {cols} ON {table} BEGIN\n"
        f"      {_delete_old(fts, columns)}\n"
        f"      INSERT INTO {fts}(rowid, {cols}) VALUES (new.id, {new});\n"
        "    END"
    )


def delete_trigger(table: str, fts: str, columns: tuple[str, ...]) -> str:
    return (
        f"CREATE TRIGGER {table}_fts_delete AFTER DELETE ON {table} BEGIN\n"
        f"      {_delete_old(fts, columns)}\n"
        "    END"
    )


def _norm(sql: str | None) -> str:
    return " ".join((sql or "").split()).upper()


def is_ours(kind: str, sql: str | None) -> bool:
    """Whether a trigger's SQL is the tool's form (`kind` 'update' or 'delete')."""
    text = _norm(sql)
    if kind == "update":
        return " AFTER UPDATE OF " in text and "'DELETE'" in text
    return "'DELETE'" in text
