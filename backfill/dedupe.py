"""Same-text dedupe: identical recipe texts are embedded once and written to every row that has them.

Two levels, both keyed by the content hash of the full recipe text (tables.content_hash):

- **Across the job (and earlier jobs):** a text whose hash already has a provenance row with the same
  model, dimensions and recipe is copied from that row, provided the row still holds a valid vector
  and its text still hashes the same (a row edited since is never a source). The lookup is one
  indexed query per page (`ix_backfill_embeddings_hash`), so memory stays bounded.
- **Within the page:** the first row with a text is sent; the others get its vector (or its error).

Every copied row is written, with its own provenance, in the page's one transaction. The tokens that
were not sent are counted as `tokens_saved` on the job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import db, tables
from backfill.schema import backfill_embeddings as prov

if TYPE_CHECKING:  # pragma: no cover
    from backfill.page import Item, PageResult


def _vector(raw: Any, dimensions: int) -> list[float] | None:
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(parsed, list) or len(parsed) != dimensions:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in parsed):
        return None
    return [float(v) for v in parsed]


def known_vectors(engine: Engine, spec: tables.Spec, hashes: Sequence[str], *, model: str, dimensions: int,
                  recipe: str, user_id: str | None = None) -> dict[str, list[float]]:
    """hash -> a vector already written for that exact text (same model, dimensions, recipe)."""
    if not hashes:
        return {}
    # Model, dimensions and recipe are checked in Python: given them in SQL, SQLite (no statistics) picks
    # the (target, model) index and scans every provenance row per page, O(rows^2) over a job.
    q = (
        sa.select(prov.c.content_hash, prov.c.model, prov.c.dimensions, prov.c.recipe_version, spec.embedding,
                  *tables.text_columns(spec))
        .select_from(prov.join(spec.table, spec.key == prov.c.row_id))
        .where(prov.c.target == spec.name, prov.c.content_hash.in_(sorted(set(hashes))))
    )
    if user_id is not None:  # a scoped job reads only its user's rows
        q = q.where(spec.user_id == user_id)
    found: dict[str, list[float]] = {}
    for row in db.retrying(engine, lambda conn: conn.execute(q).all(), write=False):  # a dropped link is retried
        digest = row[0]
        if digest in found or (row[1], row[2], row[3]) != (model, dimensions, recipe):
            continue
        if tables.content_hash(tables.recipe_text(spec, row._mapping, recipe)) != digest:
            continue  # edited since: its vector is of another text
        vec = _vector(row[4], dimensions)
        if vec is not None:
            found[digest] = vec
    return found


def reduce(engine: Engine, spec: tables.Spec, items: list[Item], result: PageResult, *, model: str,
           dimensions: int, recipe: str, user_id: str | None, across_jobs: bool = True) -> list[Item]:
    """The items that must be sent; copies are recorded in `result` (vectors, copies, tokens_saved)."""
    hashes = {i.row_id: result.hashes[i.row_id] for i in items}
    known = known_vectors(engine, spec, list(hashes.values()), model=model, dimensions=dimensions, recipe=recipe,
                          user_id=user_id) if across_jobs else {}
    send: list[Item] = []
    first: dict[str, int] = {}
    for item in items:
        digest = hashes[item.row_id]
        if digest in known:
            result.vectors[item.row_id] = list(known[digest])
            result.tokens_saved += item.tokens
        elif digest in first:
            result.copies[item.row_id] = first[digest]
            result.tokens_saved += item.tokens
        else:
            first[digest] = item.row_id
            send.append(item)
    return send


def spread(result: PageResult) -> None:
    """Give each copy its representative's vector, or its error when that one failed."""
    for row_id, source in result.copies.items():
        if source in result.vectors:
            result.vectors[row_id] = list(result.vectors[source])
        else:
            result.failures[row_id] = result.failures.get(source, "its identical text failed")
