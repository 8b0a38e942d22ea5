"""The change queue: which rows may need a vector, known without reading the table (as pgai's vectorizer does).

Revision 0008 installs `backfill_`-named triggers on `memories` and `entities`: a row inserted, deleted, or
updated in a column its recipe reads or in `embedding` is queued in `backfill_changes` in the same transaction
as the server's write (a row already queued stays as it is). The first run on a table, or `--full-scan`,
*seeds* the queue from one keyset scan: every row that needs a vector (or holds one whose text changed since
it was embedded) is queued, and `backfill_change_seeds` marks the table seeded. From then on:

- a vector's validity is checked once, when it is written or first seen: a row off the queue is known good;
- `next_page` and `pending` read queued rows only (a join on the queue's key); the page's commit calls
  `done` for the rows it wrote, in its own transaction, after the write (which queued them again);
- `settle`, before a run, takes off the queue the rows that turned out fine (the server wrote a vector) or
  were deleted (and their provenance); a row whose text changed under a valid vector stays: it is stale;
- `summary` gives `stats` its figures from the queue, a count and the provenance index;
- `follow_page` and `size` are what `up --follow` (follow.py) reads between and during its passes.

Rows written behind the triggers' back (triggers dropped, a bulk load with triggers off) are not seen until
`--full-scan`, `stats --deep` or `verify --deep` reads the table again; `verify` reports a missing trigger and
`migrate` puts it back.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import db, stale, tables
from backfill.schema import backfill_change_seeds as seeds
from backfill.schema import backfill_changes as queue
from backfill.schema import backfill_embeddings as prov
from backfill.schema import backfill_failures as failures

SEED_PAGE = 5_000  # rows per seeding transaction
SETTLE_PAGE = 1_000  # queued rows read per triage transaction
DONE_PER_STATEMENT = 500  # ids in one dequeue statement
FOLLOW_READ = 100  # queued candidates read at least per statement by follow_page
PG_FUNCTION = "backfill_queue_change"


# --- triggers -------------------------------------------------------------------------------------

def trigger_names(spec: tables.Spec) -> dict[str, str]:
    return {kind: f"backfill_{spec.name}_queue_{kind}" for kind in ("insert", "update", "delete")}


def watched_columns(spec: tables.Spec, present: Iterable[str] | None = None) -> list[str]:
    """The columns whose change queues a row: the recipe's text columns and `embedding` (those present)."""
    cols = [*spec.text_columns, spec.embedding.name]
    return cols if present is None else [c for c in cols if c in set(present)]


_SQLITE_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_PG_NOW = "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"


def _sqlite_enqueue(target: str, ref: str) -> str:
    # not INSERT OR IGNORE: an outer `INSERT OR REPLACE`/`OR FAIL` would override a trigger's conflict clause
    return (f"INSERT INTO backfill_changes (target, row_id, queued_at) SELECT '{target}', {ref}, {_SQLITE_NOW} "
            f"WHERE {ref} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM backfill_changes "
            f"WHERE target = '{target}' AND row_id = {ref});")


def sqlite_triggers(spec: tables.Spec, columns: Sequence[str]) -> dict[str, str]:
    names = trigger_names(spec)
    t = spec.name
    changed = " OR ".join(f"old.{c} IS NOT new.{c}" for c in columns)
    return {
        "insert": f"CREATE TRIGGER {names['insert']} AFTER INSERT ON {t} BEGIN {_sqlite_enqueue(t, 'new.id')} END",
        "update": (f"CREATE TRIGGER {names['update']} AFTER UPDATE OF {', '.join(columns)} ON {t} "
                   f"WHEN {changed} BEGIN {_sqlite_enqueue(t, 'new.id')} END"),
        "delete": f"CREATE TRIGGER {names['delete']} AFTER DELETE ON {t} BEGIN {_sqlite_enqueue(t, 'old.id')} END",
    }


PG_FUNCTION_SQL = f"""CREATE OR REPLACE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE rid bigint;
BEGIN
  IF TG_OP = 'DELETE' THEN rid := OLD.id; ELSE rid := NEW.id; END IF;
  IF rid IS NOT NULL THEN
    INSERT INTO backfill_changes (target, row_id, queued_at) VALUES (TG_ARGV[0], rid, {_PG_NOW})
    ON CONFLICT DO NOTHING;
  END IF;
  RETURN NULL;
END $$"""


def pg_triggers(spec: tables.Spec, columns: Sequence[str]) -> dict[str, str]:
    names = trigger_names(spec)
    t = spec.name
    run = f"FOR EACH ROW EXECUTE FUNCTION {PG_FUNCTION}('{t}')"
    changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns)
    return {
        "insert": f"CREATE TRIGGER {names['insert']} AFTER INSERT ON {t} {run}",
        "update": f"CREATE TRIGGER {names['update']} AFTER UPDATE OF {', '.join(columns)} ON {t} "
                  f"FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION {PG_FUNCTION}('{t}')",
        "delete": f"CREATE TRIGGER {names['delete']} AFTER DELETE ON {t} {run}",
    }


def _columns(conn: Connection, table: str) -> list[str]:
    return [c["name"] for c in sa.inspect(conn).get_columns(table)]


def wanted_triggers(conn: Connection, spec: tables.Spec) -> dict[str, str]:
    """name -> CREATE statement of this table's queue triggers on this backend."""
    cols = watched_columns(spec, _columns(conn, spec.name))
    made = pg_triggers(spec, cols) if conn.dialect.name == "postgresql" else sqlite_triggers(spec, cols)
    names = trigger_names(spec)
    return {names[kind]: sql for kind, sql in made.items()}


def existing_triggers(conn: Connection) -> set[str]:
    if conn.dialect.name == "postgresql":
        q = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE :p ESCAPE '!'"
    else:
        q = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE :p ESCAPE '!'"
    return {r[0] for r in conn.execute(sa.text(q), {"p": "backfill!_%"})}


def install(conn: Connection, specs: Iterable[tables.Spec] | None = None) -> list[str]:
    """Create the queue triggers that are missing (the PostgreSQL function always); their names."""
    specs = list(tables.SPECS.values()) if specs is None else list(specs)
    have = existing_triggers(conn)
    made: list[str] = []
    for spec in specs:
        if not sa.inspect(conn).has_table(spec.name):
            continue
        for name, sql in wanted_triggers(conn, spec).items():
            if name not in have:
                if not made and conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(PG_FUNCTION_SQL)
                conn.exec_driver_sql(sql)
                made.append(name)
    return made


def uninstall(conn: Connection) -> None:
    _present.pop(str(conn.engine.url), None)
    for spec in tables.SPECS.values():
        for name in trigger_names(spec).values():
            on = f" ON {spec.name}" if conn.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}{on}")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}()")


def trigger_differences(conn: Connection) -> list[str]:
    """`verify`: a queue trigger that is missing (rows it should queue would go unseen)."""
    have = existing_triggers(conn)
    out = []
    for spec in tables.SPECS.values():
        if not sa.inspect(conn).has_table(spec.name):
            continue
        for name in trigger_names(spec).values():
            if name not in have:
                out.append(f"missing change-queue trigger {name}: changes to {spec.name} go unseen; "
                           "run `backfill migrate` to restore it (then `backfill up --full-scan`)")
    return out


# --- state ----------------------------------------------------------------------------------------

_present: dict[str, bool] = {}


def present(conn: Connection) -> bool:
    """Whether the queue exists on this database (revision 0008 applied); remembered once seen."""
    key = str(conn.engine.url)
    if not _present.get(key):
        _present[key] = sa.inspect(conn).has_table(queue.name) and sa.inspect(conn).has_table(seeds.name)
    return _present[key]


def seeded(conn: Connection, spec: tables.Spec) -> bool:
    """Whether the queue can be trusted for this table: it exists and a scan has seeded it."""
    if not present(conn):
        return False
    return conn.execute(sa.select(seeds.c.target).where(seeds.c.target == spec.name)).first() is not None


def _now() -> str:
    from backfill.jobs import now_iso

    return now_iso()


def _on(spec: tables.Spec) -> sa.ColumnElement[bool]:
    return sa.and_(queue.c.target == spec.name, queue.c.row_id == spec.key)


def _prov_on(spec: tables.Spec) -> sa.ColumnElement[bool]:
    return sa.and_(prov.c.target == spec.name, prov.c.row_id == spec.key)


def _insert(conn: Connection, table: sa.Table) -> Any:
    """INSERT for this backend, with ON CONFLICT available (two runs seeding at once)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _enqueue(conn: Connection, spec: tables.Spec, select: sa.Select) -> None:
    """INSERT the keys `select` yields, those not queued yet."""
    q = select.where(~sa.exists().where(_on(spec)))
    conn.execute(_insert(conn, queue).from_select(["target", "row_id", "queued_at"], q).on_conflict_do_nothing())


def seed(engine: Engine, spec: tables.Spec, dimensions: int | None = None) -> int:
    """Queue every row that needs a vector (`dimensions`: of another length too) or whose text changed since its
    vector was made; then mark the table seeded. Keyset pages, one transaction each; the triggers are on
    meanwhile, so a row the server changes during the scan is queued either way. Returns the rows queued."""

    dialect = engine.dialect.name
    needs = tables.needs_embedding(spec, dialect, dimensions)
    length = tables.vector_length(spec.embedding, dialect)
    valid = sa.and_(sa.not_(tables.missing(spec.embedding)), tables.valid_vector(spec.embedding, dialect))
    lengths: collections.Counter[int] = collections.Counter()
    queued, after = 0, 0

    def page(conn: Connection) -> tuple[int | None, int, collections.Counter[int]]:
        """One keyset page, one transaction (retried whole by db.retrying): (its last key, rows queued, lengths)."""
        found: collections.Counter[int] = collections.Counter()
        keys = sa.select(spec.key.label("k")).where(spec.key > after).order_by(spec.key).limit(SEED_PAGE).subquery()
        upper = conn.execute(sa.select(sa.func.max(keys.c.k))).scalar()
        if upper is None:
            return None, 0, found
        bounds = (spec.key > after, spec.key <= upper)
        before = _count(conn, spec)
        _enqueue(conn, spec, sa.select(sa.literal(spec.name), spec.key, sa.literal(_now())).where(*bounds, needs))
        for n, c in conn.execute(sa.select(length, sa.func.count()).where(*bounds, valid).group_by(length)):
            if n is not None:
                found[int(n)] += int(c)
        # a vector whose row's text changed since it was embedded: hashed in Python (stale.py)
        text_stale = [int(r[0]) for rows in stale.scan(conn, spec, after=after, dimensions=dimensions,
                                                       where=(spec.key <= upper, prov.c.row_id.is_not(None)))
                      for r in rows if not r._mapping["_needs"]
                      and stale.reason(spec, r, stale.Reference(None, None, None)) == "text"]
        if text_stale:
            _enqueue(conn, spec, sa.select(sa.literal(spec.name), spec.key, sa.literal(_now()))
                     .where(spec.key.in_(text_stale)))
        return int(upper), _count(conn, spec) - before, found

    while True:
        upper, added, found = db.retrying(engine, page)
        if upper is None:
            break
        queued += added
        lengths.update(found)
        after = upper

    def mark(conn: Connection) -> None:
        # provenance of rows deleted before the queue existed: stats count provenance rows as vectors
        conn.execute(prov.delete().where(prov.c.target == spec.name,
                                         ~sa.exists().where(spec.key == prov.c.row_id)))
        dims = lengths.most_common(1)[0][0] if lengths else None
        stamp = _now()
        conn.execute(_insert(conn, seeds).values(target=spec.name, seeded_at=stamp, dimensions=dims)
                     .on_conflict_do_update(index_elements=[seeds.c.target],
                                            set_={"seeded_at": stamp, "dimensions": dims}))
    db.retrying(engine, mark)
    return queued


def _count(conn: Connection, spec: tables.Spec) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(queue).where(queue.c.target == spec.name)).scalar()
               or 0)


def _queued_rows(spec: tables.Spec, dialect: str, dimensions: int | None, after: int, limit: int) -> sa.Select:
    """Queued rows (with LEFT JOINs: deleted ones too), their state and provenance, by key."""
    needs = tables.needs_embedding(spec, dialect, dimensions)
    return (
        sa.select(queue.c.row_id.label("_qid"), spec.key, *tables.text_columns(spec),
                  sa.case((needs, 1), else_=0).label("_needs"),
                  sa.case((tables.missing(spec.embedding), 1), else_=0).label("_missing"),
                  spec.user_id.label("_user"),
                  prov.c.model.label("_p_model"), prov.c.dimensions.label("_p_dims"),
                  prov.c.recipe_version.label("_p_recipe"), prov.c.content_hash.label("_p_hash"))
        .select_from(queue.outerjoin(spec.table, queue.c.row_id == spec.key)
                     .outerjoin(prov, sa.and_(prov.c.target == spec.name, prov.c.row_id == queue.c.row_id)))
        .where(queue.c.target == spec.name, queue.c.row_id > after)
        .order_by(queue.c.row_id).limit(limit)
    )


def _text_changed(spec: tables.Spec, row: Any) -> bool:

    return row._mapping["_p_model"] is not None and \
        stale.reason(spec, row, stale.Reference(None, None, None)) == "text"


def settle(engine: Engine, spec: tables.Spec, dimensions: int | None) -> int:
    """Take off the queue the rows that need nothing (a valid vector of `dimensions`, text unchanged since it
    was embedded) and the rows that are gone (with their provenance). Read and delete in one write transaction,
    so a change the server commits meanwhile is queued again after it. Returns the rows taken off."""

    removed, after = 0, 0
    while True:
        def page(conn: Connection, after: int = after) -> tuple[int | None, int]:
            db.lock_for_write(conn)
            q = _queued_rows(spec, conn.dialect.name, dimensions, after, SETTLE_PAGE)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(of=queue)
            rows = conn.execute(q).all()
            if not rows:
                return None, 0
            gone = [int(r._qid) for r in rows if r._mapping["id"] is None]
            fine = [int(r._qid) for r in rows if r._mapping["id"] is not None and not r._needs
                    and not _text_changed(spec, r)]
            _delete(conn, spec, gone + fine)
            for start in range(0, len(gone), DONE_PER_STATEMENT):
                conn.execute(prov.delete().where(prov.c.target == spec.name,
                                                 prov.c.row_id.in_(gone[start:start + DONE_PER_STATEMENT])))
            return int(rows[-1]._qid), len(gone) + len(fine)

        last, n = db.retrying(engine, page)
        if last is None:
            return removed
        removed, after = removed + n, last


def _delete(conn: Connection, spec: tables.Spec, row_ids: Sequence[int]) -> None:
    ids = list(row_ids)
    for start in range(0, len(ids), DONE_PER_STATEMENT):
        conn.execute(queue.delete().where(queue.c.target == spec.name,
                                          queue.c.row_id.in_(ids[start:start + DONE_PER_STATEMENT])))


def done(conn: Connection, spec: tables.Spec, row_ids: Sequence[int], dimensions: int | None = None) -> None:
    """Inside a page's commit, after its vectors are written: those rows leave the queue (the write queued
    them again). A row the compare-and-set left alone is not passed here and stays queued. `dimensions`: the
    length written, which the column now holds (ensure_compatible)."""
    if not row_ids or not present(conn):
        return
    _delete(conn, spec, row_ids)
    if dimensions is not None:
        conn.execute(seeds.update().where(seeds.c.target == spec.name, sa.or_(
            seeds.c.dimensions.is_(None), seeds.c.dimensions != dimensions)).values(dimensions=dimensions))


def refresh(engine: Engine, spec: tables.Spec, dimensions: int | None, *, full_scan: bool = False) -> None:
    """Before a run: seed the queue if it never was (or `--full-scan`), then settle it."""
    fresh = db.retrying(engine, lambda conn: seeded(conn, spec) if present(conn) else None, write=False)
    if fresh is None:
        return  # no change queue here
    if full_scan or not fresh:
        seed(engine, spec, dimensions)
    settle(engine, spec, dimensions)


# --- reading ---------------------------------------------------------------------------------------

def _waiting(spec: tables.Spec, dialect: str, dimensions: int | None, user_id: str | None, after: int
             ) -> list[sa.ColumnElement[bool]]:
    return [queue.c.target == spec.name, queue.c.row_id > after,
            tables.needs_embedding(spec, dialect, dimensions), *tables.scope(spec, user_id)]


def next_page(conn: Connection, spec: tables.Spec, after: int, size: int, user_id: str | None,
              dimensions: int | None) -> list[sa.Row]:
    """The next `size` queued rows after key `after` that need a vector, with the runner's columns."""
    q = (sa.select(*tables.select_columns(spec))
         .select_from(queue.join(spec.table, queue.c.row_id == spec.key))
         .where(*_waiting(spec, conn.dialect.name, dimensions, user_id, after))
         .order_by(queue.c.row_id).limit(size))
    return list(conn.execute(q).all())


def pending(conn: Connection, spec: tables.Spec, user_id: str | None, dimensions: int | None = None,
            after: int = 0) -> int:
    """Queued rows in scope after `after` that need a vector."""
    q = (sa.select(sa.func.count()).select_from(queue.join(spec.table, queue.c.row_id == spec.key))
         .where(*_waiting(spec, conn.dialect.name, dimensions, user_id, after)))
    return int(conn.execute(q).scalar() or 0)


def follow_page(conn: Connection, spec: tables.Spec, after: int, size: int, user_id: str | None,
                dimensions: int | None, job_id: int) -> list[sa.Row]:
    """`--follow`: queued rows after key `after` that need a vector, or whose text changed since this tool
    embedded it (the server's edit kept the old vector), leaving out rows the job recorded as failed or
    skipped (a follower does not re-send them every pass; `retry-failed` does). Queued rows only: O(queue)."""
    needs = tables.needs_embedding(spec, conn.dialect.name, dimensions)
    recorded = sa.exists().where(failures.c.job_id == job_id, failures.c.target == spec.name,
                                 failures.c.row_id == queue.c.row_id, failures.c.resolved == sa.false(),
                                 failures.c.kind.in_(("failed", "skipped")))
    page: list[sa.Row] = []
    read = max(size, FOLLOW_READ)  # candidates per statement: some are filtered out below
    while len(page) < size:
        q = (sa.select(*tables.select_columns(spec), sa.case((needs, 1), else_=0).label("_needs"),
                       prov.c.model.label("_p_model"), prov.c.dimensions.label("_p_dims"),
                       prov.c.recipe_version.label("_p_recipe"), prov.c.content_hash.label("_p_hash"))
             .select_from(queue.join(spec.table, queue.c.row_id == spec.key)
                          .outerjoin(prov, sa.and_(prov.c.target == spec.name, prov.c.row_id == queue.c.row_id)))
             .where(queue.c.target == spec.name, queue.c.row_id > after, *tables.scope(spec, user_id), ~recorded,
                    sa.or_(needs, prov.c.row_id.is_not(None)))
             .order_by(queue.c.row_id).limit(read))
        rows = conn.execute(q).all()
        page += [r for r in rows if r._mapping["_needs"] or _text_changed(spec, r)][:size - len(page)]
        if len(rows) < read:
            return page
        after = int(rows[-1][0])
    return page


def size(conn: Connection, specs: Iterable[tables.Spec]) -> int:
    """Entries in the queue for these tables (a follower's poll: the triggers only add, we only take off)."""
    names = [spec.name for spec in specs]
    return int(conn.execute(sa.select(sa.func.count()).select_from(queue).where(queue.c.target.in_(names))).scalar()
               or 0)


def ensure_compatible(conn: Connection, spec: tables.Spec, provider: Any, user_id: str | None) -> None:
    """compat.ensure_compatible without its scan of every vector: the column's length is the one the seed saw
    most often, or the last job wrote (`done`). Before seeding, or with -u, compat's own scan."""
    from backfill import compat
    from backfill.errors import ConfigError

    if user_id is not None or not seeded(conn, spec):
        compat.ensure_compatible(conn, spec, provider, user_id)
        return
    for model, dims, n in conn.execute(
            sa.select(prov.c.model, prov.c.dimensions, sa.func.count()).where(prov.c.target == spec.name)
            .group_by(prov.c.model, prov.c.dimensions)):
        if model != provider.model or dims != provider.dimensions:
            raise ConfigError(
                f"{spec.name}.embedding already holds {n} vectors from {model} ({dims} dimensions); this job would "
                f"write {provider.model} ({provider.dimensions}). Use the same --model/--dimensions, or re-embed "
                "every row on purpose with --reembed-all")
    length = conn.execute(sa.select(seeds.c.dimensions).where(seeds.c.target == spec.name)).scalar()
    if length is not None and length != provider.dimensions:
        raise ConfigError(
            f"{spec.name}.embedding holds vectors of {length} dimensions; {provider.model} would write "
            f"{provider.dimensions}. Pick --model/--dimensions to match, or re-embed every row on purpose "
            "with --reembed-all")


# --- statistics ------------------------------------------------------------------------------------

@dataclass
class Summary:
    """A table's stats figures (stats.TableStats' fields) from the queue, a count and provenance."""

    total: int = 0
    missing: int = 0
    malformed: int = 0
    unaddressable: int = 0
    unknown: int = 0
    stale: dict[str, int] = field(default_factory=dict)

    @property
    def with_embedding(self) -> int:
        return self.total - self.missing - self.malformed


def summary(conn: Connection, spec: tables.Spec, user_id: str | None, ref: Any, *, with_stale: bool) -> Summary:
    """`stats` without reading the table: every row off the queue holds a valid vector, so only queued rows
    are looked at; provenance is counted by its own index, minus queued rows whose vector is not valid."""

    dialect = conn.dialect.name
    scoped = tables.scope(spec, user_id)
    out = Summary(stale=dict.fromkeys(stale.REASONS, 0))
    out.total = int(conn.execute(sa.select(sa.func.count()).select_from(spec.table).where(*scoped)).scalar() or 0)
    out.unaddressable = int(conn.execute(sa.select(sa.func.count()).select_from(spec.table)
                                         .where(spec.key.is_(None), *scoped)).scalar() or 0)
    valid = sa.and_(sa.not_(tables.missing(spec.embedding)), tables.valid_vector(spec.embedding, dialect))
    # provenance rows by (model, dimensions, recipe): the index, or with -u the user's rows
    pq = sa.select(prov.c.model, prov.c.dimensions, prov.c.recipe_version, sa.func.count()).where(
        prov.c.target == spec.name)
    if user_id is not None:
        pq = pq.select_from(prov.join(spec.table, _prov_on(spec))).where(*scoped)
    groups = {(m, d, r): int(n) for m, d, r, n in
              conn.execute(pq.group_by(prov.c.model, prov.c.dimensions, prov.c.recipe_version))}
    after, text_stale = 0, 0
    while True:
        q = _queued_rows(spec, dialect, None, after, SETTLE_PAGE).add_columns(
            sa.case((valid, 1), else_=0).label("_valid"))
        rows = conn.execute(q).all()
        if not rows:
            break
        after = int(rows[-1]._qid)
        for r in rows:
            m = r._mapping
            gone = m["id"] is None
            if gone and user_id is not None:
                continue  # not in the scoped counts above
            if not gone and user_id is not None and m["_user"] != user_id:
                continue
            if not gone and m["_valid"]:
                if with_stale and m["_p_model"] is not None and _same(ref, m) and _text_changed(spec, r):
                    text_stale += 1
                continue
            if not gone:
                out.missing += int(m["_missing"])
                out.malformed += 1 - int(m["_missing"])
            if m["_p_model"] is not None:  # provenance of a row without a valid vector (or gone): not a vector
                key = (m["_p_model"], m["_p_dims"], m["_p_recipe"])
                groups[key] = groups.get(key, 0) - 1
    with_prov = sum(groups.values())
    out.unknown = out.with_embedding - with_prov
    if with_stale:
        for (model, dims, recipe), n in groups.items():
            if _other_model(ref, model, dims):
                out.stale["model"] += n
            elif _other_recipe(ref, recipe):
                out.stale["recipe"] += n
        out.stale["text"] = text_stale
    return out


def _other_model(ref: Any, model: str, dims: int) -> bool:
    return (ref.model is not None and model != ref.model) or (ref.dimensions is not None and dims != ref.dimensions)


def _other_recipe(ref: Any, recipe: str) -> bool:
    return recipe not in tables.RECIPES or (ref.recipe is not None and recipe != ref.recipe)


def _same(ref: Any, m: Any) -> bool:
    return not _other_model(ref, m["_p_model"], m["_p_dims"]) and not _other_recipe(ref, m["_p_recipe"])


# --- on demand: the full scan -----------------------------------------------------------------------

def unqueued(conn: Connection, spec: tables.Spec) -> int:
    """`verify --deep`: rows that need a vector but are not queued (changed behind the triggers' back)."""
    if not seeded(conn, spec):
        return 0
    q = (sa.select(sa.func.count()).select_from(spec.table)
         .where(tables.needs_embedding(spec, conn.dialect.name), ~sa.exists().where(_on(spec))))
    return int(conn.execute(q).scalar() or 0)


def missed(engine: Engine, specs: Iterable[tables.Spec]) -> bool:
    """`--full-scan`, before anything is written: does a scan find rows the queue does not hold?"""
    with engine.connect() as conn:
        return any(unqueued(conn, spec) for spec in specs)


def deep_differences(conn: Connection) -> list[str]:
    out = []
    for spec in tables.SPECS.values():
        if sa.inspect(conn).has_table(spec.name):
            n = unqueued(conn, spec)
            if n:
                out.append(f"{n} {spec.name} row(s) need a vector but are not in the change queue (written behind "
                           "its triggers): run `backfill up --full-scan`")
    return out
