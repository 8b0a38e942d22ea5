"""The write path: a page's vectors and their provenance in a few statements, not one per row.

A 400-row page is one `UPDATE … SET embedding = CASE key WHEN … END WHERE key IN (…)` and one
multi-row `INSERT … ON CONFLICT DO UPDATE` for its provenance (fewer rows per statement where the
database allows fewer parameters). Both are plain SQL on SQLite, libSQL and PostgreSQL, sent
straight to the driver. On a remote database that is also two round trips per page instead of 800.

Why not `executemany`: it runs one statement per row, and the driver releases and re-takes the GIL
around every one. While another thread of this process is busy in Python (the next page's texts
being tokenized, answers being encoded), each re-take waits for that thread's switch interval.
`scripts/write-path` measures it on this machine: 400-row pages of 1536-dimension vectors on a
SQLite file, beside one busy thread, ran at 86 rows/s with `executemany` and 6,396 rows/s as one
statement, while the busy thread kept 86 % of its speed; alone the two are within 30 % of each
other either way. On a remote libSQL database the round trips alone make it 12x.

A vector's stored text is `encode_vector`'s compact JSON array (orjson), made by the caller before
the write, off the writer thread where it can be.

Compare-and-set (`current`): between a page's read and its commit the server may edit or delete its
rows. Under the write lock, inside the page's transaction, the rows are read again and a vector is
written only to a row that still exists, still has the recipe text that was embedded (same content
hash) and, unless the job re-embeds, still needs one. The others are left as they are and reported as
`changed` or `gone`: the server's concurrent writes always win.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import tables

CHECK_ROWS_PER_STATEMENT = 900  # ids in one compare-and-set read (SQLite before 3.32 allowed 999 parameters)
UPDATE_ROWS_PER_STATEMENT = 400  # vectors: 3 parameters a row (CASE pair, IN list) and one for the user

PROVENANCE_ROWS_PER_STATEMENT = 1_000  # 9 parameters a row; fewer where the database allows fewer
PROVENANCE_COLUMNS = ("target", "row_id", "provider", "model", "dimensions", "recipe_version", "content_hash",
                      "job_id", "embedded_at")


def encode_vector(vector: Sequence[float]) -> str:
    """The stored text: a compact JSON array, floats in their shortest round-trip form."""
    return _dumps(vector)


try:
    import orjson as _orjson

    def _dumps(vector: Sequence[float]) -> str:
        return _orjson.dumps(vector).decode()
except ImportError:  # pragma: no cover - orjson is a dependency; json gives the same values, 20x slower
    def _dumps(vector: Sequence[float]) -> str:
        return json.dumps(vector, separators=(",", ":"))


def _max_parameters(conn: Connection) -> int:
    """Bound parameters one statement may carry: SQLite before 3.32 allowed 999, later 32,766 (libSQL is
    newer); PostgreSQL 65,535."""
    if conn.dialect.name != "sqlite":
        return 32_766
    raw = conn.connection.driver_connection
    getlimit = getattr(raw, "getlimit", None)  # stdlib sqlite3 (3.11+); libSQL's driver has none
    if getlimit is None:
        return 32_766
    import sqlite3

    return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


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


def write_vectors(conn: Connection, spec: tables.Spec, user_id: str | None, encoded: dict[int, str]) -> None:
    """Set each row's embedding (already encoded as stored text), within the caller's transaction.
    With `user_id`, a row of another user is never written."""
    mark = _mark(conn)
    items = list(encoded.items())
    per = max(1, min(UPDATE_ROWS_PER_STATEMENT, (_max_parameters(conn) - 1) // 3))
    for start in range(0, len(items), per):
        chunk = items[start:start + per]
        params: list[Any] = [v for pair in chunk for v in pair]  # CASE key WHEN id THEN text ...
        params += [row_id for row_id, _text in chunk]  # ... WHERE key IN (ids)
        if user_id is not None:
            params.append(user_id)
        sql = _update_sql(mark, spec.table.name, spec.key.name, spec.embedding.name, len(chunk), user_id is not None)
        conn.exec_driver_sql(sql, tuple(params))


def record_provenance(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert one provenance row per written vector (model, dimensions, recipe, content hash, job)."""
    mark = _mark(conn)
    per = max(1, min(PROVENANCE_ROWS_PER_STATEMENT, _max_parameters(conn) // len(PROVENANCE_COLUMNS)))
    for start in range(0, len(rows), per):
        chunk = rows[start:start + per]
        params = tuple(row[c] for row in chunk for c in PROVENANCE_COLUMNS)
        conn.exec_driver_sql(_provenance_sql(mark, len(chunk)), params)


def current(conn: Connection, spec: tables.Spec, user_id: str | None, hashes: dict[int, str], *, recipe: str,
            still_needs: sa.ColumnElement[bool] | None) -> tuple[list[int], list[int], list[int]]:
    """Compare-and-set, in the caller's transaction and under its write lock (db.lock_for_write; on PostgreSQL the
    rows are locked here, FOR UPDATE): of the rows in `hashes` (row -> content hash of the text embedded), those
    still holding that text (and still needing a vector when `still_needs` is given), those changed since, and
    those gone (deleted, or moved out of the user's scope). Returns (fresh, changed, gone), each sorted."""
    ids = sorted(hashes)
    fresh: list[int] = []
    changed: list[int] = []
    seen: set[int] = set()
    cols = [spec.key, *tables.text_columns(spec)]
    if still_needs is not None:
        cols.append(sa.case((still_needs, 1), else_=0).label("_needs"))
    for start in range(0, len(ids), CHECK_ROWS_PER_STATEMENT):
        q = sa.select(*cols).where(spec.key.in_(ids[start:start + CHECK_ROWS_PER_STATEMENT]),
                                   *tables.scope(spec, user_id))
        if conn.dialect.name == "postgresql":
            q = q.with_for_update(of=spec.table)
        for row in conn.execute(q):
            m = row._mapping
            rid = int(m["id"])
            seen.add(rid)
            same = (still_needs is None or bool(m["_needs"])) and tables.unreadable(spec, m) is None and \
                tables.content_hash(tables.recipe_text(spec, m, recipe)) == hashes[rid]
            (fresh if same else changed).append(rid)
    gone = [rid for rid in ids if rid not in seen]
    return sorted(fresh), sorted(changed), gone
