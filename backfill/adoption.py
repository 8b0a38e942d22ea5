"""What a live database must have for the tool to work on it: the columns it reads and writes.

Real mcp-memory-ts databases differ by server version and by the scripts their owners ran
(`contact_info`, OAuth and Gmail tables, legacy columns, indexes present or not). The tool adopts
any of them that has the columns below with compatible types; everything else is the server's and
is left alone. `entities.embedding` may be missing: revision 0006 adds it with the server's own
statement (`baseline.ENTITY_EMBEDDING_SCRIPT`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# per column, the kind of value the tool reads or writes there
_ID, _TEXT, _FLAG, _ANY = "integer key", "text", "boolean or integer", "any"

NEEDED: dict[str, dict[str, str]] = {
    "memories": {"id": _ID, "user_id": _TEXT, "title": _TEXT, "content": _TEXT, "memory_type": _TEXT,
                 "tags": _TEXT, "embedding": _TEXT, "is_archived": _FLAG, "updated_at": _ANY},
    # company and title are read too: the server's entity text includes them
    "entities": {"id": _ID, "user_id": _TEXT, "name": _TEXT, "entity_type": _TEXT, "description": _TEXT,
                 "company": _TEXT, "title": _TEXT, "notes": _TEXT, "tags": _TEXT, "embedding": _TEXT},
    "users": {"id": _TEXT, "email": _TEXT},
}
SERVER_TABLES = frozenset(NEEDED)
ADDED_BY_MIGRATE = {("entities", "embedding")}  # revision 0006

# the tool's own tables and SQLite's and libSQL's internal ones are not a user's
_NOT_USER_TABLES = ("sqlite_", "libsql_", "alembic_version", "_litestream")


@dataclass(frozen=True)
class Column:
    table: str
    name: str
    declared: str  # the type as the database reports it, e.g. "TEXT", "F32_BLOB(384)", "JSONB"


def _sqlite_affinity(declared: str) -> str:
    """SQLite's column affinity rules (https://sqlite.org/datatype3.html, 3.1)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if any(s in t for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in t or not t.strip():
        return "BLOB"
    if any(s in t for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _compatible(kind: str, declared: str, dialect: str) -> bool:
    if kind == _ANY:
        return True
    t = declared.upper()
    if dialect == "sqlite":
        affinity = _sqlite_affinity(declared)
        if kind == _ID:
            return affinity == "INTEGER"
        if kind == _FLAG:
            return affinity in ("INTEGER", "NUMERIC")
        # text: TEXT affinity, or none declared; a native vector (F32_BLOB(n)…) holds no JSON text
        return affinity == "TEXT" or not t.strip()
    if kind == _ID:
        return any(s in t for s in ("INT", "SERIAL"))
    if kind == _FLAG:
        return "BOOL" in t or "INT" in t
    return any(s in t for s in ("TEXT", "CHAR", "CLOB", "STRING"))


def _columns(conn: Connection, table: str) -> dict[str, Column]:
    if conn.dialect.name == "sqlite":  # the declared type as written (the inspector may not know F32_BLOB)
        rows = conn.exec_driver_sql(f'PRAGMA table_info("{table}")').all()
        return {r[1]: Column(table, r[1], str(r[2] or "")) for r in rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        cols = sa.inspect(conn).get_columns(table)
    return {c["name"]: Column(table, c["name"], str(c["type"])) for c in cols}


def user_tables(conn: Connection) -> list[str]:
    """Tables that are neither SQLite's/libSQL's internals nor alembic's."""
    return sorted(t for t in sa.inspect(conn).get_table_names() if not t.startswith(_NOT_USER_TABLES))


def problems(conn: Connection, *, allow_added: bool = True) -> list[str]:
    """One line per needed table or column that is missing or incompatible, each with what to do.

    `allow_added`: columns a revision adds (entities.embedding) may be missing, as before `migrate`."""
    present = set(sa.inspect(conn).get_table_names())
    dialect = conn.dialect.name
    out: list[str] = []
    for table, needed in NEEDED.items():
        if table not in present:
            out.append(f"missing table {table}: this is not an mcp-memory-ts database, or the server never "
                       "started on it (start the server once, then run `backfill migrate`)")
            continue
        columns = _columns(conn, table)
        for name, kind in needed.items():
            col = columns.get(name)
            if col is None:
                if allow_added and (table, name) in ADDED_BY_MIGRATE:
                    continue
                out.append(f"missing column {table}.{name}: backfill reads it; restore it, or rename the column "
                           f"that holds it back to {name}")
            elif not _compatible(kind, col.declared, dialect):
                hint = (" (a native vector column: keep embedding as JSON text and use --vector-column for a "
                        "native copy)" if name == "embedding" and "BLOB" in col.declared.upper() else "")
                out.append(f"column {table}.{name} has type {col.declared or 'none'}, backfill needs {kind}{hint}")
    return out


def missing_added_columns(conn: Connection) -> list[tuple[str, str]]:
    """Columns a revision adds that this database does not have yet."""
    present = set(sa.inspect(conn).get_table_names())
    return [(t, c) for t, c in sorted(ADDED_BY_MIGRATE) if t in present and c not in _columns(conn, t)]
