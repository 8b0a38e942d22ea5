"""Stale rows: edited text, another model, older recipe; unknown rows (no provenance) and adoption.

The real CLI, the real openai SDK against the fake server, real databases; assertions on the data."""

from __future__ import annotations

import json

import pytest

from conftest import make_backend
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, embeddings, env_for, expected_text
from support.fake_openai import FakeOpenAI, fake_vector


def _stats(cli, url: str) -> dict:
    result = cli("stats", "--json", "--database-url", url)
    assert result.code == 0, result.output
    return json.loads(result.stdout)["tables"]


def _q(engine, sql: str) -> list:
    with engine.connect() as conn:
        return conn.exec_driver_sql(sql).all()


def _ours(engine) -> list[int]:
    """Memories whose vector this tool wrote (they have provenance), by id."""
    return [i for (i,) in _q(engine, "SELECT row_id FROM backfill_embeddings "
                                     "WHERE target = 'memories' ORDER BY row_id")]


def _rows(engine, table: str, ids: list[int]) -> dict[int, dict]:
    with engine.connect() as conn:
        got = conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id").mappings().all()
    return {r["id"]: dict(r) for r in got if r["id"] in set(ids)}


@pytest.mark.parametrize("name", ["postgresql"])
def test_editing_100_memories_reembeds_exactly_those_and_stats_reports_0_stale(name, tmp_path, cli):
    be = make_backend(name, tmp_path)
    engine = be.engine()
    build(engine, memories=500, entities=60)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("up", *RUN_ARGS, env=env).code == 0
        tables = _stats(cli, be.url)
        preexisting = [i for (i,) in _q(engine, "SELECT id FROM memories WHERE id NOT IN "
                                                "(SELECT row_id FROM backfill_embeddings WHERE target = 'memories')")]
        assert tables["memories"]["stale"] == 0 and tables["memories"]["unknown"] == len(preexisting) > 3

        ours = _ours(engine)
        edited = ours[::2][:100]
        assert len(edited) == 100
        ids = ",".join(map(str, edited + preexisting[:3]))  # 3 unknown rows edited too: not stale, not sent
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE memories SET content = content || ' edited later' WHERE id IN ({ids})")
        before = embeddings(engine, "memories")

        tables = _stats(cli, be.url)
        assert tables["memories"]["stale"] == 100
        assert tables["memories"]["stale_reasons"] == {"text": 100, "model": 0, "recipe": 0}
        assert tables["entities"]["stale"] == 0

        server.reset_log()
        result = cli("run", *RUN_ARGS, "--reembed-stale", env=env)
        assert result.code == 0, result.output[-2000:]
        assert server.stats()["inputs_embedded"] == 100
        rows = _rows(engine, "memories", edited)
        assert sorted(server.inputs_seen()) == sorted(expected_text("memories", r) for r in rows.values())

    after = embeddings(engine, "memories")
    for i, row in rows.items():
        assert json.loads(after[i]) == fake_vector(expected_text("memories", row), DIMS, MODEL)
    assert {i: v for i, v in after.items() if i not in rows} == {i: v for i, v in before.items() if i not in rows}
    tables = _stats(cli, be.url)
    assert tables["memories"]["stale"] == 0 and tables["entities"]["stale"] == 0
    assert tables["memories"]["unknown"] == len(preexisting)


def test_other_model_and_older_recipe_are_stale_and_adopt_existing_records_unknown_rows(tmp_path, cli):
    be = make_backend("libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=200, entities=40)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("up", *RUN_ARGS, env=env).code == 0
        unknown = _stats(cli, be.url)["entities"]["unknown"]
        assert unknown > 0
        with engine.begin() as conn:  # one row of another model: moving the column would strand the unknown ones
            conn.exec_driver_sql("UPDATE backfill_embeddings SET model = 'text-embedding-ada-002' WHERE target = "
                                 "'entities' AND row_id = (SELECT min(row_id) FROM backfill_embeddings WHERE "
                                 "target = 'entities')")
        server.reset_log()
        jobs_before = _q(engine, "SELECT count(*) FROM backfill_jobs")
        refused = cli("run", *RUN_ARGS, "--reembed-stale", "--log-format", "human", env=env)
        assert refused.code == 2 and "--reembed-all" in refused.stderr, refused.output
        assert server.stats()["requests"] == 0 and _q(engine, "SELECT count(*) FROM backfill_jobs") == jobs_before
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE backfill_embeddings SET model = '{MODEL}'")
        server.reset_log()
        adopted = cli("run", *RUN_ARGS, "--adopt-existing", env=env)
        assert adopted.code == 0, adopted.output
        assert server.stats()["requests"] == 0  # adoption sends nothing
        tables = _stats(cli, be.url)
        assert tables["entities"]["unknown"] == 0 and tables["memories"]["unknown"] == 0
        assert tables["entities"]["stale"] == 0
        (n_prov,) = _q(engine, "SELECT count(*) FROM backfill_embeddings "
                               "WHERE target = 'entities' AND job_id IS NOT NULL")[0]
        assert n_prov == tables["entities"]["with_embedding"]

        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE backfill_embeddings SET model = 'text-embedding-ada-002' WHERE target = "
                                 "'entities' AND row_id IN (SELECT row_id FROM backfill_embeddings WHERE target = "
                                 "'entities' ORDER BY row_id LIMIT 4)")
            conn.exec_driver_sql("UPDATE backfill_embeddings SET recipe_version = 'unicode/1' WHERE target = "
                                 "'entities' AND row_id IN (SELECT row_id FROM backfill_embeddings WHERE target = "
                                 "'entities' ORDER BY row_id DESC LIMIT 3)")
        tables = _stats(cli, be.url)
        assert tables["entities"]["stale_reasons"] == {"text": 0, "model": 4, "recipe": 3}
        server.reset_log()
        again = cli("run", *RUN_ARGS, "--reembed-stale", env=env)
        assert again.code == 0, again.output
        assert server.stats()["inputs_embedded"] == 7
    tables = _stats(cli, be.url)
    assert tables["entities"]["stale"] == 0
    models = {m for (m,) in _q(engine, "SELECT DISTINCT model FROM backfill_embeddings")}
    assert models == {MODEL}


def test_reembed_stale_with_a_limit_sends_exactly_that_many_rows(tmp_path, cli):
    """--limit counts rows handed out, committed or not: pages read ahead never overshoot it."""
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=200, entities=0)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("up", *RUN_ARGS, env=env).code == 0
        ours = _ours(engine)
        ids = ",".join(map(str, ours[:50]))
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE memories SET content = content || ' edited' WHERE id IN ({ids})")
        server.reset_log()
        limited = cli("run", *RUN_ARGS, "--reembed-stale", "--limit", "15", "-b", "5", "--concurrency", "2",
                      "--target", "memories", env=env)
        assert limited.code == 0, limited.output[-2000:]
        assert server.stats()["inputs_embedded"] == 15
    assert _stats(cli, be.url)["memories"]["stale"] == 35
