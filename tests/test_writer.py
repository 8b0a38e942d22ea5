"""writer.py: a page's vectors and provenance in a few statements, exact and scoped, on every backend."""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from backfill import migrate, sample, tables, writer
from backfill.schema import backfill_embeddings

SPEC = tables.SPECS["memories"]


def _memories(engine: sa.Engine) -> dict[int, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute(sa.text("SELECT id, user_id, embedding FROM memories"))}


def _provenance(row_id: int, model: str) -> dict:
    return {"target": "memories", "row_id": row_id, "provider": "openai", "model": model, "dimensions": 3,
            "recipe_version": tables.DEFAULT_RECIPE, "content_hash": f"{row_id:064x}", "job_id": 1,
            "embedded_at": "2026-11-27T00:00:00.000Z"}


def test_a_page_is_written_exactly_in_scope_and_in_chunks(backend):
    engine = backend.engine()
    sample.build(engine, sample.SampleSpec(memories=900, entities=0, dimensions=3))
    migrate.migrate(engine)
    before = _memories(engine)
    user = min({u for u, _e in before.values()})
    encoded = {rid: f"[{rid},0.5,-{rid}e-3]" for rid in before}  # every row offered, of every user

    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        if isinstance(raw, sqlite3.Connection):  # SQLite before 3.32: 999 parameters a statement
            raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
            assert writer._max_parameters(conn) == 999
        writer.write_vectors(conn, SPEC, user, encoded)
        writer.record_provenance(conn, [_provenance(rid, "m1") for rid in before])
        writer.record_provenance(conn, [_provenance(rid, "m2") for rid in sorted(before)[:250]])  # upserts

    after = _memories(engine)
    mine = [rid for rid, (u, _e) in before.items() if u == user]
    assert 0 < len(mine) < len(before)
    for rid, (u, embedding) in after.items():
        assert embedding == (encoded[rid] if u == user else before[rid][1]), rid  # others untouched
    with engine.connect() as conn:
        prov = {r.row_id: r for r in conn.execute(sa.select(backfill_embeddings))}
    assert sorted(prov) == sorted(before)
    assert {rid for rid, r in prov.items() if r.model == "m2"} == set(sorted(before)[:250])
    assert all(r.content_hash == f"{rid:064x}" and r.dimensions == 3 for rid, r in prov.items())
