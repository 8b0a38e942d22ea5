"""Shared pieces of the engine tests: a sample database, the fake server, the expected vectors."""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa

from backfill import sample, tables
from backfill.providers.openai import OpenAIProvider
from backfill.tokens import truncate
from support.fake_openai import fake_vector

DIMS = 16
MODEL = "text-embedding-3-small"
OTHER_COLUMNS = {
    "memories": ["id", "user_id", "title", "content", "memory_type", "importance", "tags", "entity_ids", "metadata",
                 "is_archived", "created_at", "updated_at"],
    "entities": ["id", "user_id", "name", "entity_type", "description", "company", "title", "notes", "tags",
                 "metadata", "created_at", "updated_at"],
}


def build(engine: sa.Engine, memories: int, entities: int, seed: int = 7) -> None:
    """A sample database. Behind a loopback libSQL server it is written straight into the served file
    (the same SQLite file; over the wire each insert is a round trip and the setup took most of a test)."""
    from conftest import SERVED_FILES

    served = SERVED_FILES.get(engine.url.port or 0) if engine.url.drivername == "sqlite+libsql" else None
    target = sa.create_engine(f"sqlite:///{served}") if served else engine
    sample.build(target, sample.SampleSpec(memories=memories, entities=entities, dimensions=DIMS, seed=seed))
    if served:
        target.dispose()


def poison(engine: sa.Engine, limit: int) -> list[int]:
    """The first `limit` memories that need a vector, titled so the fake server rejects them
    (`FakeOpenAI(fail_inputs=["POISON"])`); their ids."""
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text(
            "SELECT id FROM memories WHERE embedding IS NULL OR embedding IN ('', '[]') ORDER BY id LIMIT :n"),
            {"n": limit})]
    poison_ids(engine, ids)
    return ids


def poison_ids(engine: sa.Engine, ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET title = 'POISON ' || title WHERE id = :i"), [{"i": i} for i in ids])


def env_for(server, database_url: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test-not-a-real-key", "OPENAI_BASE_URL": server.base_url, "DATABASE_URL": database_url,
    }


RUN_ARGS = ["--model", MODEL, "--dimensions", str(DIMS)]


def checksum_other_columns(engine: sa.Engine, table: str, where: str = "") -> str:
    cols = ", ".join(OTHER_COLUMNS[table])
    h = hashlib.sha256()
    with engine.connect() as conn:
        for row in conn.exec_driver_sql(f"SELECT {cols} FROM {table} {where} ORDER BY id"):
            h.update(repr(tuple(row)).encode())
    return h.hexdigest()


def embeddings(engine: sa.Engine, table: str, where: str = "") -> dict[int, str | None]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(f"SELECT id, embedding FROM {table} {where} ORDER BY id").all())


def expected_text(table: str, row: dict) -> str:
    text = tables.recipe_text(tables.SPECS[table], row)
    return truncate(text, OpenAIProvider.max_input_tokens)[0]


def is_vector(value: str | None, dims: int = DIMS) -> bool:
    try:
        parsed = json.loads(value) if value else None
    except ValueError:
        return False
    return isinstance(parsed, list) and len(parsed) == dims and all(isinstance(v, (int, float)) for v in parsed)


def needing(engine: sa.Engine) -> set[tuple[str, int]]:
    """Rows whose embedding is missing or malformed, judged in Python (independent of the tool's SQL)."""
    return {(t, i) for t in tables.SPECS for i, e in embeddings(engine, t).items() if not is_vector(e)}


def assert_vectors_match_recipe(engine: sa.Engine, rows: set[tuple[str, int]]) -> int:
    """Each of `rows` now holds the fake server's vector for that row's recipe text."""
    checked = 0
    with engine.connect() as conn:
        for table, spec in tables.SPECS.items():
            cols = ", ".join(["id", "embedding", *spec.text_columns])
            for row in conn.exec_driver_sql(f"SELECT {cols} FROM {table} ORDER BY id").mappings():
                if (table, row["id"]) not in rows:
                    continue
                text = expected_text(table, row)
                assert text, f"{table}:{row['id']} has a blank recipe text"
                assert json.loads(row["embedding"]) == fake_vector(text, DIMS, MODEL), f"{table}:{row['id']}"
                checked += 1
    return checked


def check_counters(engine) -> None:
    """The jobs' embedded counters equal the provenance rows actually written."""
    with engine.connect() as conn:
        counted = conn.exec_driver_sql("SELECT coalesce(sum(embedded), 0) FROM backfill_jobs").scalar()
        written = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings").scalar()
    assert counted == written


def rows_by_text(engine) -> dict[str, set[tuple[str, int]]]:
    """Recipe text -> the rows that carry it (a few sample rows share a text)."""
    out: dict[str, set[tuple[str, int]]] = {}
    with engine.connect() as conn:
        for table, spec in tables.SPECS.items():
            cols = ", ".join(["id", *spec.text_columns])
            for row in conn.exec_driver_sql(f"SELECT {cols} FROM {table}").mappings():
                out.setdefault(expected_text(table, row), set()).add((table, row["id"]))
    return out
