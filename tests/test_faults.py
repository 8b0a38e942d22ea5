"""Provider faults, each injected by the project's fake server, through the real CLI and the real
openai SDK: retried within the budget, no malformed vector ever written, rows that exhaust the
retries become failure rows while the job goes on, a 400 fails only its own input (bisect).
Every test asserts the final database."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conftest import make_backend
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, embeddings, env_for, is_vector, needing
from support.fake_openai import FakeOpenAI

ARGS = [*RUN_ARGS, "--target", "memories", "-b", "10", "--concurrency", "1", "--timeout", "2"]


def _failures(engine) -> list[tuple[int, str, str, int]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT row_id, kind, error, attempts FROM backfill_failures ORDER BY row_id"))]


def _nothing_malformed_written(engine, before: dict[int, str | None]) -> None:
    """Every memory embedding is what it was before the run, or a well-formed vector of the right size."""
    for rid, value in embeddings(engine, "memories").items():
        assert value == before[rid] or is_vector(value), f"memories:{rid} holds {value[:80]!r}"


def _job(engine) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1")).mappings().one())


@pytest.fixture
def db(tmp_path):
    be = make_backend("sqlite", tmp_path)
    build(be.engine(), memories=40, entities=0, seed=3)
    return be


@pytest.mark.parametrize(
    "kind", ["500", "503", "429", "reset", "not_json", "wrong_dims", "nan", "inf", "short", "hang"]
)
def test_each_fault_is_retried_and_every_row_gets_its_own_vector(kind, db, cli):
    engine = db.engine()
    todo = {r for r in needing(engine) if r[0] == "memories"}
    before = embeddings(engine, "memories")
    assert len(todo) >= 10
    with FakeOpenAI(hang_s=6) as server:
        env = env_for(server, db.url)
        server.push_faults(kind)  # the first request fails once, then succeeds (3 retries allowed)
        result = cli("up", *ARGS, env=env)
        stats = server.stats()
    assert result.code == 0, result.output[-2000:]
    assert stats["faults"] == {kind: 1}
    # one request per 10 rows, plus the retried one (a timed-out one goes again in halves: two)
    assert stats["requests"] == -(-len(todo) // 10) + (2 if kind == "hang" else 1)
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    _nothing_malformed_written(engine, before)
    assert _failures(engine) == []
    job = _job(engine)
    assert (job["status"], job["embedded"], job["failed"]) == ("done", len(todo), 0)


@pytest.mark.parametrize("kinds", [("500", "503", "reset", "500"), ("wrong_dims", "nan", "short", "not_json")],
                         ids=["errors", "malformed"])
def test_rows_that_exhaust_the_retries_become_failures_and_the_job_goes_on(kinds, db, cli):
    engine = db.engine()
    todo = sorted(r[1] for r in needing(engine) if r[0] == "memories")
    before = embeddings(engine, "memories")
    with FakeOpenAI() as server:
        env = env_for(server, db.url)
        server.push_faults(*kinds)  # all four attempts of the first request fail
        result = cli("up", *ARGS, "--log-format", "human", env=env)
        seen = server.inputs_seen()
    assert result.code == 3, result.output[-2000:]
    first, rest = todo[:10], todo[10:]
    failures = _failures(engine)
    assert [f[0] for f in failures] == first and all(f[1] == "failed" for f in failures)
    stored = embeddings(engine, "memories")
    # the failed request wrote nothing
    assert {rid: stored[rid] for rid in first} == {rid: before[rid] for rid in first}
    assert assert_vectors_match_recipe(engine, {("memories", rid) for rid in rest}) == len(rest)
    assert len(seen) == len(rest)  # each of the other rows was embedded exactly once
    _nothing_malformed_written(engine, before)
    job = _job(engine)
    assert (job["status"], job["embedded"], job["failed"]) == ("done", len(rest), len(first))
    assert "Failed IDs (10)" in result.stdout


def test_a_400_on_one_input_is_split_until_it_stands_alone(db, cli):
    engine = db.engine()
    todo = sorted(r[1] for r in needing(engine) if r[0] == "memories")
    bad = todo[6]
    before = embeddings(engine, "memories")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET title = 'POISON ' || title WHERE id = :i"), {"i": bad})
    with FakeOpenAI(fail_inputs=["POISON"]) as server:
        env = env_for(server, db.url)
        result = cli("up", *ARGS, env=env)
        log = list(server.log)
    assert result.code == 3, result.output[-2000:]
    failures = _failures(engine)
    assert [(f[0], f[1]) for f in failures] == [(bad, "failed")] and "rejected" in failures[0][2]
    assert embeddings(engine, "memories")[bad] == before[bad]
    _nothing_malformed_written(engine, before)
    neighbours = {("memories", rid) for rid in todo if rid != bad}
    assert assert_vectors_match_recipe(engine, neighbours) == len(neighbours)
    rejected = [e for e in log if e["status"] == 400]
    # 10 inputs -> halves until the poisoned one is alone: at most ceil(log2(10)) + 1 rejected requests
    assert 2 <= len(rejected) <= 5 and [len(e["inputs"]) for e in rejected][-1] == 1
    # no neighbour was embedded twice
    ok = [t for e in log if e["status"] == 200 for t in e["inputs"]]
    assert len(ok) == len(set(ok)) == len(neighbours)
    assert _job(engine)["failed"] == 1
