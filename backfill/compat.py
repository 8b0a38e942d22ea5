"""One model per column (promise 6): a new job refuses a column that already holds vectors from another
model or of another length. `--reembed-all` replaces every vector on purpose and is not checked here;
`--reembed-stale` has its own check (stale.refuse_mixing)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import tables
from backfill.errors import ConfigError
from backfill.providers.base import Provider
from backfill.schema import backfill_embeddings


def ensure_compatible(conn: Connection, spec: tables.Spec, provider: Provider, user_id: str | None) -> None:
    """Refuse to mix models or dimensions in one column (promise 6)."""
    dialect = conn.dialect.name
    has_provenance = sa.inspect(conn).has_table(backfill_embeddings.name)  # not before `migrate` (up, plan)
    prov = [] if not has_provenance else conn.execute(
        sa.select(backfill_embeddings.c.model, backfill_embeddings.c.dimensions, sa.func.count())
        .where(backfill_embeddings.c.target == spec.name)
        .group_by(backfill_embeddings.c.model, backfill_embeddings.c.dimensions)
    ).all()
    for model, dims, n in prov:
        if model != provider.model or dims != provider.dimensions:
            raise ConfigError(
                f"{spec.name}.embedding already holds {n} vectors from {model} ({dims} dimensions); this job would "
                f"write {provider.model} ({provider.dimensions}). Use the same --model/--dimensions, or re-embed "
                "every row on purpose with --reembed-all"
            )
    length = tables.vector_length(spec.embedding, dialect)
    row = conn.execute(
        sa.select(length.label("n"), sa.func.count().label("c")).select_from(spec.table)
        .where(sa.not_(tables.missing(spec.embedding)), tables.valid_vector(spec.embedding, dialect),
               *tables.scope(spec, user_id))
        .group_by(length).order_by(sa.func.count().desc()).limit(1)
    ).first()
    if row is not None and row.n != provider.dimensions:
        raise ConfigError(
            f"{spec.name}.embedding holds {row.c} vectors of {row.n} dimensions; {provider.model} would write "
            f"{provider.dimensions}. Pick --model/--dimensions to match, or re-embed every row on purpose "
            "with --reembed-all"
        )
