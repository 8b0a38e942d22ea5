"""Native libSQL vectors: an `F32_BLOB(dims)` column beside the JSON `embedding`, and its ANN index.

`--vector-column NAME` (run/up) adds the column when it is missing (a tool-run DDL step:
`ALTER TABLE t ADD COLUMN NAME F32_BLOB(dims)`; the name is the user's, so no migration can know it)
and writes `vector32(embedding)` for every row of a page, in the page's transaction.
`backfill index` fills the cells still NULL (vectors embedded before the column existed), then
builds `libsql_vector_idx` — after the backfill, because writes into an indexed column are tens of
times slower (scripts/vector-index-cost) — and checks that `vector_top_k` finds each probe row's own vector.

Only libSQL has these functions: on SQLite or PostgreSQL the options are refused (exit 2).

The column is remembered: a job started with `--vector-column` records it in its parameters, and every later
job on that table (`configured`) keeps the column in step with the JSON it writes, with or without the flag,
so a cron `up --reembed-stale` never leaves an old native vector behind. Through a driver without `vector32`
(a `sqlite:///` URL on the same file) the cell is set to NULL instead, never left stale, and `index` fills it.
`index` also refreshes every cell that differs from its row's JSON, and empties cells whose JSON is gone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import db, tables
from backfill.errors import ConfigError, SchemaDrift

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DECL = re.compile(r"^\s*F32_BLOB\s*\(\s*(\d+)\s*\)\s*$", re.I)
PAGE = 2000
PROBES = 20
# vector_top_k's k for the check: libSQL's index is approximate (DiskANN) and its search list grows with k, so the
# nearest of 10 is what a search for the top 10 returns, and it misses less often than k = 1
SEARCH_K = 10


def index_name(spec: tables.Spec, column: str) -> str:
    return f"{spec.name}_{column}_vidx"


def check_backend(kind: str, column: str) -> None:
    """Refuse before any work: a bad name, or a database that is not libSQL."""
    if not _NAME.match(column):
        raise ConfigError(f"--vector-column {column!r} is not a plain SQL name: use letters, digits and _")
    if kind not in ("libsql", "libsql-remote"):
        raise ConfigError(f"--vector-column needs libSQL (F32_BLOB, vector32, libsql_vector_idx); this database is "
                          f"{kind}: use a sqlite+libsql:///FILE or libsql://HOST URL, or drop --vector-column")


def _declared(conn: Connection, spec: tables.Spec, column: str) -> str | None:
    # read whole: on a libSQL file, a statement not read to its end keeps its read lock until its cursor goes
    for row in conn.exec_driver_sql(f"PRAGMA table_info({spec.name})").all():
        if row[1] == column:
            return str(row[2] or "")
    return None


def dimensions_of(conn: Connection, spec: tables.Spec, column: str) -> int | None:
    """N of the column's F32_BLOB(N) declaration; None when the column does not exist."""
    decl = _declared(conn, spec, column)
    if decl is None:
        return None
    found = _DECL.match(decl)
    if not found:
        raise ConfigError(f"{spec.name}.{column} is declared {decl or 'without a type'}, not F32_BLOB(N): "
                          "pick another --vector-column name")
    return int(found.group(1))


def prepare(conn: Connection, kind: str, specs: list[tables.Spec], column: str, dimensions: int) -> list[str]:
    """Check support and every table first, then add the column where it is missing (call it after every other
    check: libSQL commits DDL at once); returns the tables it was added to."""
    check_backend(kind, column)
    added = []
    try:
        conn.exec_driver_sql("SELECT vector32('[1]')").scalar()
    except Exception:  # noqa: BLE001 - the driver's own error type varies
        raise ConfigError("this libSQL build has no vector functions (vector32): upgrade libSQL/sqld, "
                          "or drop --vector-column") from None
    for spec in specs:
        dims = dimensions_of(conn, spec, column)
        if dims is None:
            added.append(spec.name)
        elif dims != dimensions:
            raise ConfigError(f"{spec.name}.{column} is F32_BLOB({dims}); this job writes {dimensions} "
                              "dimensions: use a matching --dimensions or another --vector-column")
    for name in added:
        conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {column} F32_BLOB({int(dimensions)})")
    return added


def write(conn: Connection, spec: tables.Spec, column: str, row_ids: list[int]) -> None:
    """In the page's transaction: the native column mirrors the JSON just written."""
    if row_ids:
        conn.exec_driver_sql(f"UPDATE {spec.name} SET {column} = vector32(embedding) WHERE id = ?",
                             [(int(r),) for r in row_ids])


def clear(conn: Connection, spec: tables.Spec, column: str, row_ids: list[int]) -> None:
    """Where the native copy cannot be made (no vector32, other dimensions): NULL, never a stale vector."""
    if row_ids:
        conn.exec_driver_sql(f"UPDATE {spec.name} SET {column} = NULL WHERE id = ?", [(int(r),) for r in row_ids])


@dataclass(frozen=True)
class Mirror:
    """A native column a job keeps in step with the JSON: `native` writes vector32, otherwise NULL."""

    column: str
    native: bool

    def apply(self, conn: Connection, spec: tables.Spec, row_ids: list[int]) -> None:
        (write if self.native else clear)(conn, spec, self.column, row_ids)


def configured(conn: Connection, spec: tables.Spec, dimensions: int, given: str | None = None) -> list[Mirror]:
    """The native columns configured for this table (by this job's `--vector-column` or any earlier job's) that
    exist: each one is written whenever a vector is, by every job."""
    from backfill.schema import backfill_jobs

    if conn.dialect.name != "sqlite":
        return []
    names = {given} if given else set()
    if sa.inspect(conn).has_table(backfill_jobs.name):
        for (params,) in conn.execute(sa.select(backfill_jobs.c.params).where(
                backfill_jobs.c.target.in_([spec.name, "all"]), backfill_jobs.c.params.like('%"vector_column"%'))):
            try:
                name = json.loads(params or "{}").get("vector_column")
            except ValueError:
                continue
            if isinstance(name, str) and _NAME.match(name):
                names.add(name)
    native_driver = conn.dialect.driver == "libsql"
    out = []
    for name in sorted(names):
        decl = _declared(conn, spec, name)
        found = _DECL.match(decl) if decl is not None else None
        if found is not None:
            out.append(Mirror(name, native_driver and int(found.group(1)) == dimensions))
    return out


def fill(engine: Engine, spec: tables.Spec, column: str, dimensions: int) -> int:
    """Bring the column in step with the JSON, in keyset pages: write it where the row's JSON vector has the right
    size and the cell is NULL or differs from it (the row was re-embedded without the column), and empty it where
    the JSON is missing or of another size. Returns the cells changed."""
    length = tables.vector_length(spec.embedding, "sqlite")
    good = sa.and_(sa.not_(tables.missing(spec.embedding)), tables.valid_vector(spec.embedding, "sqlite"),
                   length == dimensions)
    ref = f"{spec.name}.{column}"
    # vector32() only ever sees a good vector (CASE), and a cell equal to it is left alone
    differs = sa.literal_column(f"{ref} IS NULL OR {ref} != vector32({spec.name}.embedding)", sa.Boolean)
    done, after = 0, 0

    def page(conn: Connection) -> list[Any]:  # one transaction per page, retried whole (db.retrying)
        rows = conn.execute(
            sa.select(spec.key, sa.case((good, 1), else_=0).label("good"))
            .where(spec.key > after, sa.case((good, differs), else_=sa.literal_column(f"{ref} IS NOT NULL")))
            .order_by(spec.key).limit(PAGE)).all()
        write(conn, spec, column, [int(r[0]) for r in rows if r[1]])
        clear(conn, spec, column, [int(r[0]) for r in rows if not r[1]])
        return list(rows)

    while rows := db.retrying(engine, page):
        done += len(rows)
        after = int(rows[-1][0])
    return done


@dataclass
class IndexResult:
    table: str
    index: str
    filled: int
    rows: int
    probes: int
    found: int


def build_and_check(engine: Engine, kind: str, spec: tables.Spec, column: str, probes: int = PROBES) -> IndexResult:
    """Fill, build the index, and query `vector_top_k` with `probes` rows' own vectors."""
    check_backend(kind, column)
    with engine.connect() as conn:
        dims = dimensions_of(conn, spec, column)
    if dims is None:
        raise ConfigError(f"{spec.name} has no column {column}: run `backfill run --vector-column {column}` first")
    filled = fill(engine, spec, column, dims)
    name = index_name(spec, column)
    db.retrying(engine, lambda conn: conn.exec_driver_sql(
        f"CREATE INDEX IF NOT EXISTS {name} ON {spec.name} (libsql_vector_idx({column}))"))
    with engine.connect() as conn:
        rows = int(conn.exec_driver_sql(f"SELECT count(*) FROM {spec.name} WHERE {column} IS NOT NULL").scalar_one())
        step = max(1, rows // probes) if rows else 1
        sample = conn.exec_driver_sql(
            f"SELECT id, vector_extract({column}) FROM (SELECT id, {column}, row_number() OVER (ORDER BY id) AS n "
            f"FROM {spec.name} WHERE {column} IS NOT NULL) WHERE (n - 1) % {step} = 0 LIMIT {probes}").all()
        found = 0
        for row_id, vec in sample:
            # the nearest row is the probe itself, or a row holding the very same vector (same text)
            hit = conn.exec_driver_sql(
                f"SELECT t.id, vector_distance_cos(t.{column}, vector32(?)) AS d "
                f"FROM vector_top_k('{name}', vector32(?), {SEARCH_K}) AS k JOIN {spec.name} AS t ON t.rowid = k.id "
                "ORDER BY d LIMIT 1", (vec, vec)).first()
            if hit is not None and (hit[0] == row_id or abs(hit[1]) < 1e-6):
                found += 1
    result = IndexResult(spec.name, name, filled, rows, len(sample), found)
    if found != len(sample):
        raise SchemaDrift(f"{name}: vector_top_k found the probe's own vector for {found} of {len(sample)} probes")
    return result
