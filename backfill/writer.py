"""The write path: a page's vectors and their provenance in a few statements, not one per row.

Each statement covers up to ROWS_PER_STATEMENT rows: one `UPDATE … SET embedding = CASE key WHEN …
END WHERE key IN (…)` and one multi-row `INSERT … ON CONFLICT DO UPDATE` for provenance. Both
are plain SQL on SQLite, libSQL and PostgreSQL.

Why not `executemany`: it runs one statement per row, and the driver releases and re-takes the GIL
around every one. While another thread of this process is busy in Python (the next page's texts
being tokenized, answers being decoded and encoded), each re-take waits for that thread's switch
interval: on a SQLite file, 400-row pages of 1536-dimension vectors went from 16,000 rows/s alone to
130 rows/s beside one busy thread. As one statement the same rows keep 7,700 rows/s, and the other
thread keeps 90 % of its speed: the database work and the Python work overlap instead of queueing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Connection

from backfill import targets

ROWS_PER_STATEMENT = 100  # provenance: 9 parameters a row, under SQLite's historical 999-parameter limit
UPDATE_ROWS_PER_STATEMENT = 400  # vectors: 2 parameters a row (and one for the user)

PROVENANCE_COLUMNS = ("target", "row_id", "provider", "model", "dimensions", "recipe_version", "content_hash",
                      "job_id", "embedded_at")


def _mark(conn: Connection) -> str:
    """The driver's own placeholder: statements go straight to it (exec_driver_sql), because binding
    thousands of named parameters through SQLAlchemy costs more than the INSERT itself."""
    style = conn.dialect.paramstyle
    if style == "qmark":
        return "?"
    if style in ("format", "pyformat"):
        return "%s"
    raise ValueError(f"unsupported driver parameter style {style!r}")


@lru_cache(maxsize=64)
def _update_sql(mark: str, table: str, key: str, column: str, rows: int, scoped: bool) -> str:
    whens = " ".join(f"WHEN {mark} THEN {mark}" for _ in range(rows))
    keys = ", ".join(mark for _ in range(rows))
    scope = f" AND user_id = {mark}" if scoped else ""
    return f"UPDATE {table} SET {column} = CASE {key} {whens} END WHERE {key} IN ({keys}){scope}"


@lru_cache(maxsize=64)
def _provenance_sql(mark: str, rows: int) -> str:
    cols = ", ".join(PROVENANCE_COLUMNS)
    one = "(" + ", ".join(mark for _ in PROVENANCE_COLUMNS) + ")"
    updates = ", ".join(f"{c} = excluded.{c}" for c in PROVENANCE_COLUMNS[2:])
    return (f"INSERT INTO backfill_embeddings ({cols}) VALUES {', '.join(one for _ in range(rows))} "
            f"ON CONFLICT (target, row_id) DO UPDATE SET {updates}")


def write_vectors(conn: Connection, spec: targets.Spec, user_id: str | None, encoded: dict[int, str]) -> None:
    """Set each row's embedding (already encoded as stored text), within the caller's transaction.
    With `user_id`, a row of another user is never written."""
    mark = _mark(conn)
    items = list(encoded.items())
    for start in range(0, len(items), UPDATE_ROWS_PER_STATEMENT):
        chunk = items[start:start + UPDATE_ROWS_PER_STATEMENT]
        params: list[Any] = [v for pair in chunk for v in pair]  # CASE key WHEN id THEN text ...
        params += [row_id for row_id, _text in chunk]  # ... WHERE key IN (ids)
        if user_id is not None:
            params.append(user_id)
        sql = _update_sql(mark, spec.table.name, spec.key.name, spec.embedding.name, len(chunk), user_id is not None)
        conn.exec_driver_sql(sql, tuple(params))


def record_provenance(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert one provenance row per written vector (model, dimensions, recipe, content hash, job)."""
    mark = _mark(conn)
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        conn.exec_driver_sql(_provenance_sql(mark, len(chunk)), tuple(row[c] for row in chunk for c in PROVENANCE_COLUMNS))
