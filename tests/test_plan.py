"""`plan` and `--max-cost`: the plan's tokens are the tokens the provider bills, exactly; its cost is
tokens x price; a run over budget is refused before any request. Real CLI, real SDK, fake server."""

from __future__ import annotations

import json

import pytest

from conftest import make_backend
from engine_helpers import RUN_ARGS, build, embeddings, env_for, needing
from support.fake_openai import FakeOpenAI

PRICE = 0.37  # USD per 1M tokens, deliberately not the table's


def _jobs(engine):
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql("SELECT * FROM backfill_jobs ORDER BY id").mappings()]


@pytest.mark.parametrize("backend_name", ["sqlite", "postgresql"])
def test_plan_tokens_equal_the_servers_count_and_cost_is_tokens_times_price(tmp_path, cli, backend_name):
    be = make_backend(backend_name, tmp_path)
    engine = be.engine()
    build(engine, memories=400, entities=120, seed=3)
    todo = needing(engine)
    assert cli("migrate", "--database-url", be.url).code == 0
    args = [*RUN_ARGS, "-b", "40", "--price-per-mtok", str(PRICE)]
    planned = cli("plan", *args, "--json", "--database-url", be.url)  # no API key needed
    assert planned.code == 0, planned.output
    p = json.loads(planned.stdout)
    assert p["rows"] == len(todo) and p["truncated"] >= 1  # the sample has texts over 8,191 tokens
    assert p["cost_usd"] == pytest.approx(p["tokens"] * PRICE / 1_000_000, abs=1e-9)
    with FakeOpenAI() as server:
        run = cli("run", *args, env=env_for(server, be.url))
        assert run.code == 0, run.output[-2000:]
        seen = server.stats()
    assert seen["tokens_embedded"] == p["tokens"]
    assert seen["by_status"] == {"200": p["requests"]}
    assert seen["inputs_embedded"] == p["rows"] - p["skipped"] - p["copied"]  # identical texts are sent once
    job = _jobs(engine)[-1]
    assert job["tokens"] == p["tokens"] and job["requests"] == p["requests"]
    assert job["cost_usd"] == pytest.approx(p["tokens"] * PRICE / 1_000_000, rel=1e-9)
    assert needing(engine) == set()


def test_plan_follows_scope_limit_and_the_open_jobs_cursor(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=300, entities=60, seed=5)
    assert cli("migrate", "--database-url", be.url).code == 0
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        first = cli("run", *RUN_ARGS, "-u", "alice@example.com", "--limit", "30", "-b", "10", env=env)
        assert first.code == 0, first.output[-2000:]
        rest = json.loads(cli("plan", *RUN_ARGS, "-u", "alice@example.com", "-b", "10", "--json", env=env).stdout)
        server.reset_log()
        second = cli("run", *RUN_ARGS, "-u", "alice@example.com", "-b", "10", env=env)
        assert second.code == 0, second.output[-2000:]
        seen = server.stats()
    assert len(_jobs(engine)) == 1  # the second run resumed the job the plan started from
    assert rest["rows"] > 0 and seen["tokens_embedded"] == rest["tokens"] and seen["requests"] == rest["requests"]


def test_max_cost_below_the_plan_refuses_before_any_request(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=200, entities=50)
    before = {t: embeddings(engine, t) for t in ("memories", "entities")}
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        p = json.loads(cli("plan", *RUN_ARGS, "--json", env=env).stdout)
        assert p["cost_usd"] > 0
        for command in ("run", "up"):
            if command == "run":
                assert cli("migrate", env=env).code == 0
            refused = cli(command, *RUN_ARGS, "--max-cost", str(p["cost_usd"] / 2), "--log-format", "human", env=env)
            assert refused.code == 2, refused.output
            assert "--max-cost" in refused.stderr and "Traceback" not in refused.output
            assert len(refused.stderr.strip().splitlines()) == 1
            assert server.stats()["requests"] == 0
        assert p["cost_usd_batch"] == p["cost_usd"] * 0.5  # the Batch API bills half
        refused = cli("run", *RUN_ARGS, "--mode", "batch", "--max-cost", str(p["cost_usd"] * 0.4), "--log-format",
                      "human", env=env)
        assert refused.code == 2 and "Batch API half price" in refused.stderr, refused.output
        assert server.stats()["requests"] == 0 and not _jobs(engine)
        assert sum(j["embedded"] for j in _jobs(engine)) == 0
        assert {t: embeddings(engine, t) for t in ("memories", "entities")} == before
        ok = cli("run", *RUN_ARGS, "--max-cost", str(p["cost_usd"] * 1.01), env=env)
        assert ok.code == 0, ok.output[-2000:]
        assert server.stats()["tokens_embedded"] == p["tokens"]
