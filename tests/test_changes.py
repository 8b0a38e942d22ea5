"""The change queue (revision 0008, backfill/changes.py): the triggers queue what the server changes, `up`
reads the queue (not the table) once it is seeded, and `--full-scan`, `stats --deep`, `verify --deep` read the
table on demand. Real databases, the real CLI, the fake OpenAI server; assertions on the data."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import command

from backfill import changes, migrate
from engine_helpers import DIMS, RUN_ARGS, build, embeddings, env_for, is_vector, needing
from support.fake_openai import FakeOpenAI

STAMP = "2026-01-01T00:00:00.000Z"


def _queue(engine: sa.Engine) -> set[tuple[str, int]]:
    with engine.connect() as conn:
        return {(t, int(i)) for t, i in conn.exec_driver_sql("SELECT target, row_id FROM backfill_changes")}


def _exec(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for sql in statements:
            conn.exec_driver_sql(sql)


def _insert_memory(engine: sa.Engine, title: str, embedding: str | None = None) -> int:
    """A memory as the server's createMemory writes it (here without a vector: its OpenAI call failed)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO memories (user_id, title, content, memory_type, importance, tags, embedding, "
            "is_archived, created_at, updated_at) VALUES ('u-alice', :t, 'written by the server', 'semantic', 2, "
            "'[]', :e, :f, :s, :s)"), {"t": title, "e": embedding, "f": False, "s": STAMP})
        return int(conn.exec_driver_sql("SELECT max(id) FROM memories").scalar())


def _ids(engine: sa.Engine, table: str, where: str, n: int) -> list[int]:
    with engine.connect() as conn:
        return [int(r[0]) for r in conn.exec_driver_sql(f"SELECT id FROM {table} WHERE {where} ORDER BY id LIMIT {n}")]


def _migrated(backend, memories: int = 60, entities: int = 20) -> sa.Engine:
    engine = backend.engine()
    build(engine, memories=memories, entities=entities)
    migrate.migrate(engine)
    return engine


def _up(backend, server, *args: str, cli) -> str:
    result = cli("up", *RUN_ARGS, *args, env=env_for(server, backend.url))
    assert result.code == 0, result.output[-3000:]
    return result.output


def test_triggers_queue_inserts_recipe_edits_and_cleared_vectors_only(backend):
    engine = _migrated(backend)
    _exec(engine, "DELETE FROM backfill_changes")
    with_vector = _ids(engine, "memories", "substr(embedding, 1, 1) = '[' AND length(embedding) > 4", 4)
    entity = _ids(engine, "entities", "1 = 1", 2)
    new = _insert_memory(engine, "inserted")
    _exec(engine,
          f"UPDATE memories SET title = title || ' edited' WHERE id = {with_vector[0]}",
          f"UPDATE memories SET embedding = NULL WHERE id = {with_vector[1]}",
          f"UPDATE memories SET importance = 4, updated_at = '{STAMP}' WHERE id = {with_vector[2]}",  # not read
          f"UPDATE memories SET title = title WHERE id = {with_vector[3]}",  # no change
          f"UPDATE entities SET notes = 'new notes' WHERE id = {entity[0]}",
          f"UPDATE entities SET phone = '555' WHERE id = {entity[1]}")  # not read by the recipe
    assert _queue(engine) == {("memories", new), ("memories", with_vector[0]), ("memories", with_vector[1]),
                              ("entities", entity[0])}
    _exec(engine, f"DELETE FROM memories WHERE id = {with_vector[2]}")
    assert ("memories", with_vector[2]) in _queue(engine)
    # a second write to a queued row keeps one entry, and the server's write succeeds
    _exec(engine, f"UPDATE memories SET content = 'again' WHERE id = {new}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT content FROM memories WHERE id = {new}").scalar() == "again"
        assert conn.exec_driver_sql(
            f"SELECT count(*) FROM backfill_changes WHERE target = 'memories' AND row_id = {new}").scalar() == 1


def test_up_empties_the_queue_and_a_later_insert_gets_its_vector(sql_backend, cli):
    engine = _migrated(sql_backend)
    assert needing(engine)
    with FakeOpenAI() as server:
        _up(sql_backend, server, cli=cli)  # the first run seeds, then embeds from the queue
        assert needing(engine) == set()
        assert _queue(engine) == set()
        with engine.connect() as conn:
            assert {r[0] for r in conn.exec_driver_sql("SELECT target FROM backfill_change_seeds")} == \
                {"memories", "entities"}
        new = _insert_memory(engine, "after seeding")
        assert _queue(engine) == {("memories", new)}
        requests = server.stats()["requests"]
        _up(sql_backend, server, cli=cli)
        assert server.stats()["requests"] > requests
    assert is_vector(embeddings(engine, "memories", f"WHERE id = {new}")[new], DIMS)
    assert needing(engine) == set()
    assert _queue(engine) == set()


def test_a_row_changed_behind_the_triggers_back_needs_full_scan(sql_backend, cli):
    """A plain `up` reads only the queue: a row broken where the triggers cannot see stays broken (so no scan
    happened); `verify --deep` names it and `up --full-scan` finds and embeds it."""
    engine = _migrated(sql_backend)
    with FakeOpenAI() as server:
        _up(sql_backend, server, cli=cli)
        hidden = _ids(engine, "memories", "1 = 1", 3)
        _exec(engine, f"UPDATE memories SET embedding = NULL WHERE id IN ({hidden[0]}, {hidden[1]})",
              "DELETE FROM backfill_changes")  # as if written with the triggers off
        out = _up(sql_backend, server, cli=cli)
        assert "nothing to embed" in out
        stored = embeddings(engine, "memories")
        assert (stored[hidden[0]], stored[hidden[1]]) == (None, None)
        deep = cli("verify", "--deep", "--database-url", sql_backend.url)
        assert deep.code == 1 and "2 memories row(s) need a vector but are not in the change queue" in deep.output
        assert cli("verify", "--database-url", sql_backend.url).code == 0  # the plain verify reads no rows
        _up(sql_backend, server, "--full-scan", cli=cli)
    assert needing(engine) == set()
    assert _queue(engine) == set()
    assert cli("verify", "--deep", "--database-url", sql_backend.url).code == 0


def test_a_missing_trigger_is_drift_and_migrate_puts_it_back(sql_backend, cli):
    engine = _migrated(sql_backend)
    on = " ON memories" if sql_backend.name == "postgresql" else ""
    _exec(engine, f"DROP TRIGGER backfill_memories_queue_insert{on}")
    drift = cli("verify", "--database-url", sql_backend.url, "--log-format", "human")
    assert drift.code == 1 and "missing change-queue trigger backfill_memories_queue_insert" in drift.stderr
    fixed = cli("migrate", "--database-url", sql_backend.url, "--log-format", "human")
    assert fixed.code == 0 and "backfill_memories_queue_insert" in fixed.output
    assert cli("verify", "--database-url", sql_backend.url).code == 0
    _exec(engine, "DELETE FROM backfill_changes")
    new = _insert_memory(engine, "queued again")
    assert _queue(engine) == {("memories", new)}


def _stats(backend, cli, *args: str) -> dict:
    result = cli("stats", "--json", *args, "--database-url", backend.url)
    assert result.code == 0, result.output[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return {k: data[k] for k in ("tables", "verdict", "recommendation")}


def test_stats_from_the_queue_equal_the_deep_figures(sql_backend, cli):
    engine = _migrated(sql_backend, memories=80, entities=30)
    with FakeOpenAI() as server:
        _up(sql_backend, server, cli=cli)
    embedded = "id IN (SELECT row_id FROM backfill_embeddings WHERE target = '{}')"
    entity = _ids(engine, "entities", embedded.format("entities"), 1)[0]
    rows = _ids(engine, "memories", embedded.format("memories"), 2)
    rows += _ids(engine, "memories", f"id NOT IN ({rows[0]}, {rows[1]})", 6)
    _exec(engine,
          f"UPDATE memories SET content = content || ' edited' WHERE id IN ({rows[0]}, {rows[1]})",  # stale: text
          f"UPDATE memories SET embedding = NULL WHERE id = {rows[2]}",
          f"UPDATE memories SET embedding = '[1, 2,' WHERE id = {rows[3]}",  # malformed
          f"UPDATE memories SET embedding = '' WHERE id = {rows[4]}",
          f"DELETE FROM memories WHERE id = {rows[5]}",
          f"UPDATE entities SET name = name || ' renamed' WHERE id = {entity}")
    _insert_memory(engine, "no vector yet")
    _insert_memory(engine, "vector of its own", json.dumps([0.5] * DIMS))
    fast, deep = _stats(sql_backend, cli), _stats(sql_backend, cli, "--deep")
    assert fast == deep
    memories = fast["tables"]["memories"]
    assert (memories["missing"], memories["malformed"], memories["stale_reasons"]["text"]) == (3, 1, 2)
    assert fast["tables"]["entities"]["stale_reasons"]["text"] == 1
    alice = ("-u", "alice@example.com")
    assert _stats(sql_backend, cli, *alice) == _stats(sql_backend, cli, *alice, "--deep")


def test_downgrade_drops_the_queue_and_its_triggers(backend):
    engine = _migrated(backend)
    with migrate.one_transaction(engine) as conn:
        command.downgrade(migrate.alembic_config(conn), "0007")
    with engine.connect() as conn:
        assert not changes.existing_triggers(conn)
        assert not sa.inspect(conn).has_table("backfill_changes")
    new = _insert_memory(engine, "the server's write still works")
    assert new > 0
