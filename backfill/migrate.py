"""migrate, adopt, verify: Alembic's API, in-process, on our own connection, in one transaction.

- An empty database gets every revision, only when asked (`create=True`: `backfill migrate --create`).
- A live mcp-memory-ts database (the server's tables present, no `alembic_version`) is *adopted* when
  it has what the tool reads and writes (adoption.py), whatever else the server and its scripts put
  there: stamped 0001 and upgraded. Otherwise nothing is written and each missing or incompatible
  column is named (exit 1). A database holding other tables only is not the server's: refused.
- Every upgrade (stamp included) runs in one real transaction, also on SQLite and libSQL, whose
  drivers would otherwise commit each DDL statement on its own: killed at any statement, the
  database is left as it was before `migrate`.
- `verify` checks what the tool owns and needs: the revision, the needed columns, its own tables
  (Alembic's comparison) and, on SQLite/libSQL, the FTS5 triggers it keeps correct (fts.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from backfill import adoption, baseline, changes, db, fts
from backfill.errors import EmptyDatabase, SchemaDrift
from backfill.schema import OWN_TABLE_NAMES, metadata


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


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001 - Alembic's hook signature
    """Compare only the tool's own tables: the data tables are the server's (adoption.py checks them)."""
    if type_ == "table":
        return name in OWN_TABLE_NAMES
    return True


def include_name(name, type_, parent_names):  # noqa: ANN001 - Alembic's hook signature
    """Reflect only the tool's own tables (the others are left out by `include_object` anyway)."""
    return type_ != "table" or name in OWN_TABLE_NAMES


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
        return f"missing constraint on {diff[1].table.name}"
    if kind in ("remove_constraint", "remove_fk"):
        return f"unexpected constraint on {diff[1].table.name}"
    if kind == "modify_type":
        return f"column {diff[2]}.{diff[3]} has type {diff[5]}, expected {diff[6]}"
    if kind == "modify_nullable":
        expected = "NULL" if diff[6] else "NOT NULL"
        return f"column {diff[2]}.{diff[3]} nullability differs, expected {expected}"
    return f"{kind} on {diff[2] if len(diff) > 2 else '?'}"


def _pk_nullability(diff) -> bool:  # noqa: ANN001
    """SQLite reports PRIMARY KEY columns as nullable; that is not drift."""
    if isinstance(diff, list) and len(diff) == 1:
        diff = diff[0]
    if isinstance(diff, tuple) and diff[0] == "modify_nullable":
        table = metadata.tables.get(diff[2])
        return table is not None and diff[3] in table.c and table.c[diff[3]].primary_key
    return False


def _own_table_differences(conn: Connection) -> list[str]:
    ctx = MigrationContext.configure(conn, opts={"include_name": include_name, "include_object": include_object,
                                                 "compare_type": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffs = [d for d in compare_metadata(ctx, metadata) if not _pk_nullability(d)]
    out = []
    for d in diffs:
        text = _describe(d)
        repairable = text.startswith(("missing table", "missing index"))  # `migrate` re-creates these
        out.append(f"{text}: run `backfill migrate`" if repairable else
                   f"{text} (backfill's own table was altered by hand: restore it)")
    return out


def _repair_own_objects(conn: Connection) -> list[str]:
    """At head: re-create any of the tool's own tables or indexes that went missing."""
    own = [t for t in metadata.sorted_tables if t.name in OWN_TABLE_NAMES]
    inspector = sa.inspect(conn)
    present = set(inspector.get_table_names())
    repaired = [t.name for t in own if t.name not in present]
    if repaired:
        metadata.create_all(conn, tables=[t for t in own if t.name in repaired], checkfirst=True)
    kept = [t for t in own if t.name not in repaired]
    indexes = inspector.get_multi_indexes(filter_names=[t.name for t in kept]) if kept else {}
    have = {(table, i["name"]) for (_schema, table), found in indexes.items() for i in found}
    for table in kept:
        for index in table.indexes:
            if (table.name, index.name) not in have:
                index.create(conn)
                repaired.append(str(index.name))
    return repaired


def _triggers(conn: Connection) -> tuple[set[str], dict[str, str]]:
    rows = conn.execute(sa.text("SELECT type, name, sql FROM sqlite_master WHERE type IN ('table', 'trigger')")).all()
    return {n for t, n, _s in rows if t == "table"}, {n: s or "" for t, n, s in rows if t == "trigger"}


def fts_differences(conn: Connection, *, at_head: bool) -> list[str]:
    """The server's FTS5 tables need their three triggers each; at head, update and delete are ours."""
    if conn.dialect.name != "sqlite":
        return []
    tables, triggers = _triggers(conn)
    out = []
    for table, fts_table, _columns in fts.TABLES:
        if fts_table not in tables:
            continue  # no full-text index on this database: nothing of it to keep correct
        for kind in ("insert", "update", "delete"):
            name = f"{table}_fts_{kind}"
            if name not in triggers:
                out.append(f"missing FTS trigger {name}: {fts_table} no longer follows {table}; "
                           "run `backfill migrate` to restore it")
            elif at_head and kind != "insert" and not fts.is_ours(kind, triggers[name]):
                what = "fires on every UPDATE and keeps the old words" if kind == "update" else "keeps deleted words"
                out.append(f"FTS trigger {name} is the server's own version again ({what}): "
                           "run `backfill migrate` to put the corrected one back")
    return out


def _repair_fts_triggers(conn: Connection) -> list[str]:
    """At head: re-create any FTS trigger that is missing or the server's version again."""
    tables, triggers = _triggers(conn)
    repaired = []
    for table, fts_table, columns in fts.TABLES:
        if fts_table not in tables:
            continue
        wanted = {"update": fts.update_trigger(table, fts_table, columns),
                  "delete": fts.delete_trigger(table, fts_table, columns),
                  "insert": next(s for s in baseline.FTS if f" {table}_fts_insert " in s)}
        for kind, sql in wanted.items():
            name = f"{table}_fts_{kind}"
            if name in triggers and (kind == "insert" or fts.is_ours(kind, triggers[name])):
                continue
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
            conn.exec_driver_sql(sql)
            repaired.append(name)
    return repaired


@dataclass
class MigrateResult:
    action: str  # created | adopted | upgraded | at-head | repaired
    from_revision: str | None
    to_revision: str
    notes: list[str] = field(default_factory=list)


@contextmanager
def one_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside one real transaction, DDL included, committed at the end or rolled back.

    SQLite's DDL is transactional, but Python's sqlite3 and libSQL's driver open a transaction only
    before INSERT/UPDATE/DELETE, so each CREATE, DROP or ALTER ran on its own and committed at once.
    An explicit BEGIN (IMMEDIATE: take the write lock now, not halfway) keeps them all in one."""
    with engine.connect() as conn, _transaction(conn):
        yield conn


@contextmanager
def _transaction(conn: Connection) -> Iterator[None]:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def _refuse_unless_adoptable(conn: Connection, tables: list[str], *, create: bool) -> str:
    """'created' for an empty database (when asked), 'adopted' for the server's; else a typed refusal."""
    if not tables:
        if not create:
            raise EmptyDatabase(
                "the database is empty (no tables): nothing was changed. To create the mcp-memory-ts schema "
                "in it, run `backfill migrate --create`; to work on your server's database, fix --database-url"
            )
        return "created"
    server = sorted(set(tables) & adoption.SERVER_TABLES)
    if not server:
        shown = ", ".join(tables[:8]) + (f" and {len(tables) - 8} more" if len(tables) > 8 else "")
        raise SchemaDrift(
            "not an mcp-memory-ts database: nothing was changed",
            details=[f"it holds {shown}, and none of {', '.join(sorted(adoption.SERVER_TABLES))}",
                     "point --database-url at the server's database (its DATABASE_URL or TURSO_URL)"],
        )
    problems = adoption.problems(conn)
    if problems:
        raise SchemaDrift("this database lacks what backfill reads and writes; nothing was changed",
                          details=problems)
    return "adopted"


def migrate(engine: Engine, *, create: bool = False) -> MigrateResult:
    """Bring the database to head in one transaction; adopt the server's database; create only if asked.
    A locked database or a dropped connection is waited out like every other write (db.retrying): the
    transaction is all or nothing, so it is run again whole (a stream a killed run left holding the write
    lock on a libSQL server failed the next `up` at its first statement)."""
    head = head_revision()
    return db.retrying(engine, lambda conn: _migrate(conn, head, create), write=False)


def _migrate(conn: Connection, head: str, create: bool) -> MigrateResult:
    with _transaction(conn):
        current = current_revision(conn)
        if current == head:
            repaired = _repair_own_objects(conn)
            repaired += _repair_fts_triggers(conn) if conn.dialect.name == "sqlite" else []
            repaired += changes.install(conn)  # change queue: put back a missing trigger (changes.py)
            return MigrateResult("repaired" if repaired else "at-head", current, head, notes=repaired)
        action = "upgraded"
        if current is None:
            action = _refuse_unless_adoptable(conn, adoption.user_tables(conn), create=create)
        cfg = alembic_config(conn)
        if action == "adopted":
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")
        notes = _repair_fts_triggers(conn) if conn.dialect.name == "sqlite" else []
    return MigrateResult(action, current, head, notes=notes)


@dataclass
class VerifyResult:
    revision: str | None
    head: str
    differences: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


def verify(engine: Engine, *, deep: bool = False) -> VerifyResult:
    """What the tool owns and needs; objects the server adds (tables, columns, indexes) are not drift.
    `deep`: also scan for rows that need a vector but are not in the change queue (changes.py)."""
    head = head_revision()
    return db.retrying(engine, lambda conn: _verify(conn, head, deep), write=False)  # a dropped link: read again


def _verify(conn: Connection, head: str, deep: bool) -> VerifyResult:
    current = current_revision(conn)
    diffs = []
    if current != head:
        diffs.append(f"revision is {current or 'none (never migrated)'}, head is {head}: run `backfill migrate`")
    diffs += adoption.problems(conn, allow_added=current != head)
    if current is not None:
        diffs += _own_table_differences(conn)
    diffs += fts_differences(conn, at_head=current == head)
    if current == head:  # change queue: missing triggers; with --deep, rows it missed (changes.py)
        diffs += changes.trigger_differences(conn) + (changes.deep_differences(conn) if deep else [])
    conn.rollback()
    return VerifyResult(current, head, list(dict.fromkeys(diffs)))
