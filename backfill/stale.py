"""Stale embeddings: rows whose vector no longer matches what this tool would write today.

A row with a valid vector is judged against its provenance row (`backfill_embeddings`):

- **unknown**: no provenance (embedded before this tool, or by the server's create path). Not stale;
  `--adopt-existing` records its current hash so later edits are noticed.
- **stale, model**: embedded with another model or dimensions than the reference.
- **stale, recipe**: embedded with another recipe version than the reference.
- **stale, text**: the row's recipe text, computed now, hashes differently: it was edited since.

The model, dimensions and recipe are compared in SQL; the text can only be hashed in Python, so
rows are read in keyset pages (a LEFT JOIN on provenance, never OFFSET) and hashed one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import db, tables
from backfill.schema import backfill_embeddings as prov
from backfill.schema import backfill_jobs

SCAN_PAGE = 1000
REASONS = ("text", "model", "recipe")


@dataclass(frozen=True)
class Reference:
    """What a fresh vector looks like today; None parts are not compared."""

    model: str | None
    dimensions: int | None
    recipe: str | None


@dataclass
class StaleCounts:
    stale: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    unknown: int = 0

    @property
    def total(self) -> int:
        return sum(self.stale.values())


def has_provenance(conn: Connection) -> bool:
    return sa.inspect(conn).has_table(prov.name)


def reference_for(conn: Connection, table: str) -> Reference:
    """The latest job that wrote this table defines the column's model, dimensions and recipe."""
    if not sa.inspect(conn).has_table(backfill_jobs.name):
        return Reference(None, None, None)
    row = conn.execute(
        sa.select(backfill_jobs.c.model, backfill_jobs.c.dimensions, backfill_jobs.c.recipe_version)
        .where(backfill_jobs.c.target.in_([table, "all"]))
        .order_by(backfill_jobs.c.id.desc()).limit(1)
    ).first()
    return Reference(*row) if row else Reference(None, None, None)


def _scan_query(spec: tables.Spec, dialect: str, after: int, limit: int, user_id: str | None,
                dimensions: int | None, where: tuple = ()) -> sa.Select:
    needs = tables.needs_embedding(spec, dialect, dimensions)
    q = (
        sa.select(
            *tables.select_columns(spec),
            sa.case((needs, 1), else_=0).label("_needs"),
            prov.c.model.label("_p_model"), prov.c.dimensions.label("_p_dims"),
            prov.c.recipe_version.label("_p_recipe"), prov.c.content_hash.label("_p_hash"),
        )
        .select_from(spec.table.outerjoin(prov, sa.and_(prov.c.target == spec.name, prov.c.row_id == spec.key)))
        .where(spec.key > after, *where)
        .order_by(spec.key)
        .limit(limit)
    )
    if user_id is not None:
        q = q.where(spec.user_id == user_id)
    return q


def reason(spec: tables.Spec, row: Any, ref: Reference) -> str | None:
    """'text' | 'model' | 'recipe' for a stale row, 'unknown' without provenance, None when fresh."""
    m = row._mapping
    if m["_p_model"] is None:
        return "unknown"
    if (ref.model is not None and m["_p_model"] != ref.model) or (
            ref.dimensions is not None and m["_p_dims"] != ref.dimensions):
        return "model"
    if (ref.recipe is not None and m["_p_recipe"] != ref.recipe) or m["_p_recipe"] not in tables.RECIPES:
        return "recipe"
    if tables.content_hash(tables.recipe_text(spec, m, m["_p_recipe"])) != m["_p_hash"]:
        return "text"
    return None


def scan(conn: Connection, spec: tables.Spec, *, after: int = 0, user_id: str | None = None,
         dimensions: int | None = None, page: int = SCAN_PAGE, where: tuple = ()) -> Iterator[list[sa.Row]]:
    """Every row in scope after `after`, with `_needs` and its provenance, page by page by key."""
    while True:
        rows = list(conn.execute(_scan_query(spec, conn.dialect.name, after, page, user_id, dimensions, where)).all())
        if not rows:
            return
        yield rows
        after = int(rows[-1][0])


def count(conn: Connection, spec: tables.Spec, ref: Reference, user_id: str | None = None, *,
          texts: bool = True) -> StaleCounts:
    """Stale rows by reason and unknown rows, among rows holding a valid vector."""
    out = StaleCounts()
    if not has_provenance(conn):
        return out
    dialect = conn.dialect.name
    valid = sa.and_(sa.not_(tables.missing(spec.embedding)), tables.valid_vector(spec.embedding, dialect))
    other_model = sa.or_(sa.false(), *([prov.c.model != ref.model] if ref.model is not None else []),
                         *([prov.c.dimensions != ref.dimensions] if ref.dimensions is not None else []))
    other_recipe = sa.or_(prov.c.recipe_version.not_in(list(tables.RECIPES)),
                          *([prov.c.recipe_version != ref.recipe] if ref.recipe is not None else []))
    has = prov.c.row_id.is_not(None)
    q = sa.select(  # everything but the text is decided in SQL
        sa.func.coalesce(sa.func.sum(sa.case((sa.not_(has), 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((sa.and_(has, other_model), 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((sa.and_(has, sa.not_(other_model), other_recipe), 1), else_=0)), 0),
    ).select_from(spec.table.outerjoin(prov, sa.and_(prov.c.target == spec.name, prov.c.row_id == spec.key))
                  ).where(valid, *([spec.user_id == user_id] if user_id is not None else []))
    unknown, model, recipe = (int(v) for v in conn.execute(q).one())
    out.unknown, out.stale["model"], out.stale["recipe"] = unknown, model, recipe
    same = (has, valid, sa.not_(other_model), sa.not_(other_recipe))
    for rows in scan(conn, spec, user_id=user_id, where=same) if texts else ():  # only these need their text hashed
        out.stale["text"] += sum(1 for row in rows if reason(spec, row, ref) == "text")
    return out


def wanted(spec: tables.Spec, row: Any, ref: Reference) -> bool:
    """Needs an embedding, or holds a stale one (unknown rows are left alone)."""
    if row._mapping["_needs"]:
        return True
    return reason(spec, row, ref) not in (None, "unknown")


def remaining(conn: Connection, spec: tables.Spec, ref: Reference, user_id: str | None, after: int) -> int:
    """Rows a `--reembed-stale` job still has to send after `after`."""
    return sum(1 for rows in scan(conn, spec, after=after, user_id=user_id, dimensions=ref.dimensions)
               for row in rows if wanted(spec, row, ref))


def adopt(engine: Engine, spec: tables.Spec, *, provider: str, model: str, dimensions: int, recipe: str,
          user_id: str | None = None, job_id: int | None = None) -> int:
    """Record provenance (today's hash) for valid vectors of `dimensions` that have none; nothing is sent.

    The caller vouches that these vectors were made by `model` from this recipe. One transaction per page.
    """
    from backfill.jobs import now_iso

    dialect = engine.dialect.name
    length = tables.vector_length(spec.embedding, dialect)
    adopted, after = 0, 0

    def page(conn: Connection) -> list[Any]:  # one transaction per page, retried whole (db.retrying)
        q = (sa.select(*tables.select_columns(spec))
             .select_from(spec.table.outerjoin(prov, sa.and_(prov.c.target == spec.name,
                                                             prov.c.row_id == spec.key)))
             .where(spec.key > after, prov.c.row_id.is_(None), sa.not_(tables.missing(spec.embedding)),
                    tables.valid_vector(spec.embedding, dialect), length == dimensions)
             .order_by(spec.key).limit(SCAN_PAGE))
        if user_id is not None:
            q = q.where(spec.user_id == user_id)
        rows = conn.execute(q).all()
        if rows:
            stamp = now_iso()
            conn.execute(prov.insert(), [
                {"target": spec.name, "row_id": int(r[0]), "provider": provider, "model": model,
                 "dimensions": dimensions, "recipe_version": recipe,
                 "content_hash": tables.content_hash(tables.recipe_text(spec, r._mapping, recipe)),
                 "job_id": job_id, "embedded_at": stamp}
                for r in rows
            ])
        return list(rows)

    while rows := db.retrying(engine, page):
        adopted += len(rows)
        after = int(rows[-1][0])
    return adopted


def refuse_mixing(conn: Connection, spec: tables.Spec, model: str, dimensions: int, user_id: str | None) -> None:
    """`--reembed-stale` may move a column to a new model only when no vector of unknown origin would stay behind."""
    from backfill.errors import ConfigError

    if not has_provenance(conn):
        return
    other = conn.execute(sa.select(sa.func.count()).select_from(prov).where(
        prov.c.target == spec.name, sa.or_(prov.c.model != model, prov.c.dimensions != dimensions))).scalar()
    if not other:
        return
    unknown = count(conn, spec, Reference(None, None, None), user_id, texts=False).unknown
    if unknown:
        raise ConfigError(
            f"{spec.name}: {unknown} vector(s) have no provenance and would stay in their old model while "
            f"--reembed-stale moves {other} row(s) to {model} ({dimensions} dimensions): re-embed every row on "
            "purpose with --reembed-all"
        )
