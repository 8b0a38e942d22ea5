"""migrate, adopt, verify: Alembic's API, in-process, on our own connection.

- An empty database gets every revision.
- A live mcp-memory-ts database (data tables present, no `alembic_version`) is *adopted*: its
  tables are compared with the baseline (revision 0001); if they match it is stamped 0001 and
  upgraded; if not, nothing is written and the differences are listed (exit 1).
- `verify` compares the live schema with the migrations' metadata (Alembic's comparison), checks
  the revision is head and, on SQLite/libSQL, that the FTS5 tables and triggers exist.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from backfill import baseline
from backfill.errors import SchemaDrift
from backfill.schema import DATA_TABLE_NAMES, EXPRESSION_INDEXES, OWN_TABLE_NAMES, metadata

_SHADOW_SUFFIXES = ("_data", "_idx", "_content", "_docsize", "_config")


def script_location() -> str:
    """`migrations/` beside the package in a checkout, else the copy shipped in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "migrations", here / "_migrations"):
        if (candidate / "env.py").is_file():
            return str(candidate)
    raise RuntimeError("backfill's migrations folder is missing from this installation")


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _is_shadow(name: str) -> bool:
    if name.startswith(("sqlite_", "libsql_", "_litestream")):
        return True
    return any(name == f"{fts}{suffix}" for fts in baseline.FTS_TABLES for suffix in _SHADOW_SUFFIXES)


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001 - Alembic's hook signature
    """Compare only what the migrations own; ignore FTS5/libSQL shadow tables and foreign tables."""
    if type_ == "index" and name in EXPRESSION_INDEXES:
        return False
    if type_ == "column" and reflected and compare_to is None and isinstance(obj.type, sa.types.NullType):
        return False  # an added column of a type SQLAlchemy cannot read: libSQL's F32_BLOB (vectors.py)
    if type_ == "table":
        if name is None or _is_shadow(name) or name in baseline.FTS_TABLES:
            return False
        # a table neither we nor the baseline know (e.g. an old `learned_patterns`) is not ours to judge
        if reflected and compare_to is None and name not in DATA_TABLE_NAMES | OWN_TABLE_NAMES:
            return False
    return True


def _baseline_only(obj, name, type_, reflected, compare_to):  # noqa: ANN001
    if type_ == "table" and name in OWN_TABLE_NAMES:
        return False
    return include_object(obj, name, type_, reflected, compare_to)


def _describe(diff) -> str:  # noqa: ANN001 - Alembic's diff tuples
    if isinstance(diff, list):
        return "; ".join(_describe(d) for d in diff)
    kind = diff[0]
    if kind == "add_table":
        return f"missing table {diff[1].name}"
    if kind == "remove_table":
        return f"unexpected table {diff[1].name}"
    if kind == "add_column":
        return f"missing column {diff[2]}.{diff[3].name}"
    if kind == "remove_column":
        return f"unexpected column {diff[2]}.{diff[3].name}"
    if kind == "add_index":
        return f"missing index {diff[1].name} on {diff[1].table.name}"
    if kind == "remove_index":
        return f"unexpected index {diff[1].name} on {diff[1].table.name}"
    if kind in ("add_constraint", "add_fk"):
        return f"missing constraint on {diff[1].table.name}: {diff[1]!r}"[:200]
    if kind in ("remove_constraint", "remove_fk"):
        return f"unexpected constraint on {diff[1].table.name}: {diff[1]!r}"[:200]
    if kind == "modify_type":
        return f"column {diff[2]}.{diff[3]} has type {diff[5]}, expected {diff[6]}"
    if kind == "modify_nullable":
        expected = "NULL" if diff[6] else "NOT NULL"
        return f"column {diff[2]}.{diff[3]} nullability differs, expected {expected}"
    return " ".join(str(part) for part in diff)[:200]


# revision 0005 makes these fire only on an UPDATE OF the indexed columns
NARROWED_FTS_TRIGGERS = ("memories_fts_update", "entities_fts_update")


def _fts_differences(conn: Connection, *, baseline_only: bool = False) -> list[str]:
    if conn.dialect.name != "sqlite":
        return []
    rows = conn.execute(sa.text("SELECT type, name, sql FROM sqlite_master WHERE type IN ('table', 'trigger')")).all()
    present = {(t, n) for t, n, _sql in rows}
    out = [f"missing FTS5 table {n}" for n in baseline.FTS_TABLES if ("table", n) not in present]
    out += [f"missing FTS trigger {n}" for n in baseline.FTS_TRIGGERS if ("trigger", n) not in present]
    if not baseline_only:  # the baseline is the server's wide triggers; head has 0005's
        sql = {n: " ".join((text or "").split()).upper() for t, n, text in rows if t == "trigger"}
        out += [f"FTS trigger {n} fires on every UPDATE (the server's own version; revision 0005 replaced it): "
                "run `alembic downgrade 0004` then `backfill migrate`"
                for n in NARROWED_FTS_TRIGGERS if n in sql and " AFTER UPDATE OF " not in sql[n]]
    return out


def _embedding_column_differences(conn: Connection) -> list[str]:
    inspector = sa.inspect(conn)
    out = []
    for table in ("memories", "entities"):
        if not inspector.has_table(table):
            continue
        with warnings.catch_warnings():  # a native F32_BLOB(n) column (vectors.py) reflects as NullType
            warnings.simplefilter("ignore", sa.exc.SAWarning)
            cols = {c["name"]: c for c in inspector.get_columns(table)}
        col = cols.get("embedding")
        if col is None:
            out.append(f"missing column {table}.embedding")
        elif not isinstance(col["type"], (sa.Text, sa.String)):
            out.append(f"column {table}.embedding has type {col['type']}, expected TEXT (a JSON array)")
    return out


def _pk_nullability(diff) -> bool:  # noqa: ANN001
    """SQLite reports PRIMARY KEY columns as nullable; that is not drift."""
    if isinstance(diff, list) and len(diff) == 1:
        diff = diff[0]
    if isinstance(diff, tuple) and diff[0] == "modify_nullable":
        table = metadata.tables.get(diff[2])
        return table is not None and diff[3] in table.c and table.c[diff[3]].primary_key
    return False


def differences(conn: Connection, *, baseline_only: bool = False) -> list[str]:
    """Every way the live schema differs from the migrations' metadata, one line each."""
    ctx = MigrationContext.configure(
        conn,
        opts={
            "include_object": _baseline_only if baseline_only else include_object,
            "compare_type": True,
        },
    )
    with warnings.catch_warnings():
        # SQLite cannot reflect expression indexes; Alembic skips them on both sides and says so
        warnings.simplefilter("ignore")
        diffs = [d for d in compare_metadata(ctx, metadata) if not _pk_nullability(d)]
    out = [_describe(d) for d in diffs]
    if baseline_only:
        out = [d for d in out if not any(own in d for own in OWN_TABLE_NAMES)]
    out += _fts_differences(conn, baseline_only=baseline_only)
    for extra in _embedding_column_differences(conn):
        if extra not in out:
            out.append(extra)
    return sorted(set(out), key=out.index)


@dataclass
class MigrateResult:
    action: str  # created | adopted | upgraded | at-head
    from_revision: str | None
    to_revision: str
    notes: list[str] = field(default_factory=list)


def migrate(engine: Engine) -> MigrateResult:
    head = head_revision()
    with engine.connect() as conn:
        current = current_revision(conn)
        tables = set(sa.inspect(conn).get_table_names())
        conn.rollback()
        if current == head:
            return MigrateResult("at-head", current, head)
        action = "upgraded"
        if current is None:
            present = tables & DATA_TABLE_NAMES
            if present:
                diffs = differences(conn, baseline_only=True)
                conn.rollback()
                if diffs:
                    raise SchemaDrift(
                        "live schema differs from the mcp-memory-ts baseline; nothing was changed",
                        details=diffs,
                    )
                action = "adopted"
            else:
                action = "created"
    with engine.begin() as conn:
        cfg = alembic_config(conn)
        if action == "adopted":
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")
    return MigrateResult(action, current, head)


@dataclass
class VerifyResult:
    revision: str | None
    head: str
    differences: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


def verify(engine: Engine) -> VerifyResult:
    head = head_revision()
    with engine.connect() as conn:
        current = current_revision(conn)
        diffs = differences(conn)
        conn.rollback()
    if current != head:
        diffs.insert(0, f"revision is {current or 'none (never migrated)'}, head is {head}: run `backfill migrate`")
    return VerifyResult(current, head, diffs)
