"""The engine end to end: the real CLI in a subprocess, the real openai SDK, the project's fake
server on loopback, real database files. Assertions are on the data."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from conftest import ROOT, make_backend
from engine_helpers import (
    DIMS,
    RUN_ARGS,
    assert_vectors_match_recipe,
    build,
    check_counters,
    checksum_other_columns,
    embeddings,
    env_for,
    is_vector,
    needing,
    poison,
    rows_by_text,
)
from support.fake_openai import FakeOpenAI


def _jobs(engine):
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql("SELECT * FROM backfill_jobs ORDER BY id").mappings()]


def test_up_embeds_every_row_with_the_recipe_vector_and_touches_nothing_else(engine_backend, cli):
    be = engine_backend
    engine = be.engine()
    big = be.name in ("sqlite", "libsql")  # the slower backends get fewer rows; the point survives
    build(engine, memories=4000 if big else 800, entities=1200 if big else 240)
    before = {t: checksum_other_columns(engine, t) for t in ("memories", "entities")}
    todo = needing(engine)
    kept = {t: {i: e for i, e in embeddings(engine, t).items() if (t, i) not in todo} for t in ("memories", "entities")}
    assert (1000 if big else 200) < len(todo) < 5200
    with FakeOpenAI() as server:
        result = cli("up", *RUN_ARGS, "-b", "200", env=env_for(server, be.url))
        assert result.code == 0, result.output[-2000:]
        requests = server.stats()["requests"]
    assert requests > 0
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    assert needing(engine) == set()
    for t, rows in kept.items():  # embeddings that were already there are untouched
        current = embeddings(engine, t)
        assert {i: current[i] for i in rows} == rows
    assert {t: checksum_other_columns(engine, t) for t in ("memories", "entities")} == before
    if be.path is not None:  # SQLite family: the FTS indexes are still consistent
        with sqlite3.connect(be.path) as raw:
            raw.execute("INSERT INTO memories_fts(memories_fts) VALUES ('integrity-check')")
            raw.execute("INSERT INTO entities_fts(entities_fts) VALUES ('integrity-check')")
    job = _jobs(engine)[-1]
    with engine.connect() as conn:
        written = conn.execute(sa.text("SELECT count(*) FROM backfill_embeddings WHERE job_id = :j"),
                               {"j": job["id"]}).scalar()
    assert job["status"] == "done" and job["embedded"] == written and job["failed"] == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["tables"]["memories"]["coverage"] == 100.0


def test_second_up_sends_nothing_and_exits_0(engine_backend, cli):
    be = engine_backend
    build(be.engine(), memories=150, entities=40)
    with FakeOpenAI() as server:
        assert cli("up", *RUN_ARGS, env=env_for(server, be.url)).code == 0
        server.reset_log()
        again = cli("up", *RUN_ARGS, env=env_for(server, be.url))
        assert again.code == 0, again.output
        assert server.stats()["requests"] == 0


def test_user_scope_changes_only_that_users_rows(engine_backend, cli):
    be = engine_backend
    engine = be.engine()
    build(engine, memories=300, entities=100)
    others = "WHERE user_id <> 'u-alice'"
    before = {t: (embeddings(engine, t, others), checksum_other_columns(engine, t, others))
              for t in ("memories", "entities")}
    with FakeOpenAI() as server:
        result = cli("up", *RUN_ARGS, "-u", "alice@example.com", env=env_for(server, be.url))
        assert result.code == 0, result.output[-2000:]
    after = {t: (embeddings(engine, t, others), checksum_other_columns(engine, t, others))
             for t in ("memories", "entities")}
    assert after == before
    with engine.connect() as conn:
        missing = "(embedding IS NULL OR embedding IN ('', '[]'))"
        alice_missing = conn.exec_driver_sql(
            f"SELECT count(*) FROM memories WHERE user_id = 'u-alice' AND {missing}").scalar()
        others_missing = conn.exec_driver_sql(
            f"SELECT count(*) FROM memories WHERE user_id <> 'u-alice' AND {missing}").scalar()
    assert alice_missing == 0 and others_missing > 0
    bad = cli("run", *RUN_ARGS, "-u", "nobody@example.com", env={"OPENAI_API_KEY": "sk-x", "DATABASE_URL": be.url})
    assert bad.code == 2 and "nobody@example.com" in bad.stdout


def test_rejected_inputs_become_failures_and_retry_failed_sends_only_them(engine_backend, cli):
    be = engine_backend
    engine = be.engine()
    build(engine, memories=300, entities=0)
    poisoned = poison(engine, 3)
    with FakeOpenAI(fail_inputs=["POISON"]) as server:
        env = env_for(server, be.url)
        first = cli("up", *RUN_ARGS, "--target", "memories", "--log-format", "human", "-b", "50", env=env)
        assert first.code == 3, first.output[-2000:]
        assert "Failed IDs (3)" in first.stdout and all(f"memories:{rid}" in first.stdout for rid in poisoned)
        with engine.connect() as conn:
            failures = conn.exec_driver_sql(
                "SELECT row_id, error FROM backfill_failures WHERE kind = 'failed' ORDER BY row_id").all()
        assert [f[0] for f in failures] == poisoned
        assert all("rejected" in f[1] for f in failures)
        assert all(embeddings(engine, "memories")[rid] in (None, "", "[]") for rid in poisoned)
        server.configure(fail_inputs=[])
        server.reset_log()
        retry = cli("retry-failed", env=env)
        assert retry.code == 0, retry.output[-2000:]
        sent = server.inputs_seen()
    assert len(sent) == 3 and all(t.startswith("POISON") for t in sent)
    stored = embeddings(engine, "memories")
    assert all(json.loads(stored[rid]) for rid in poisoned)
    job = _jobs(engine)[-1]
    assert job["failed"] == 0


def test_missing_key_and_model_change_are_refused(engine_backend, tmp_path, cli):
    be = engine_backend
    engine = be.engine()
    build(engine, memories=50, entities=10)
    assert cli("migrate", "--database-url", be.url).code == 0
    nokey = cli("run", *RUN_ARGS, "--database-url", be.url, "--log-format", "human", cwd=tmp_path)
    assert nokey.code == 2 and "OPENAI_API_KEY not found in environment" in nokey.stderr
    assert _jobs(engine) == []
    with FakeOpenAI() as server:
        assert cli("up", *RUN_ARGS, env=env_for(server, be.url)).code == 0
        other = cli("run", "--model", "text-embedding-3-large", "--dimensions", str(DIMS),
                    "--log-format", "human", env=env_for(server, be.url))
    assert other.code == 2 and "--reembed-all" in other.stderr


def test_piped_output_is_json_lines_and_a_terminal_gets_a_bar_and_the_final_block(engine_backend, tmp_path, cli):
    be = engine_backend
    build(be.engine(), memories=200, entities=20)
    assert cli("migrate", "--database-url", be.url).code == 0
    with FakeOpenAI() as server:
        piped = cli("run", *RUN_ARGS, "-b", "20", "--concurrency", "1", env=env_for(server, be.url))
        assert piped.code == 0, piped.output
        events = [json.loads(line) for line in piped.stdout.splitlines()]
        batches = [e for e in events if e["event"] == "batch_committed"]
        assert len(batches) >= 5
        fields = {"job", "target", "rows", "embedded", "failed", "tokens", "rate", "eta_s", "cursor"}
        assert all(fields <= set(b) for b in batches)
        assert events[-1]["event"] == "job_finished" and events[-1]["embedded"] == sum(b["embedded"] for b in batches)

        (tmp_path / "tty").mkdir()
        be2 = make_backend("libsql", tmp_path / "tty")
        build(be2.engine(), memories=200, entities=20)
        import pty

        pid, fd = pty.fork()
        if pid == 0:
            os.environ.update(env_for(server, be2.url))
            os.execv(sys.executable,
                     [sys.executable, "-m", "backfill", "up", *RUN_ARGS, "-b", "20", "--concurrency", "1"])
        chunks = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert os.WEXITSTATUS(status) == 0, screen[-2000:]
    assert "rows/s" in screen and "━" in screen
    assert "Final Statistics:" in screen and "Successfully generated:" in screen and "Coverage: 100%" in screen


@pytest.mark.parametrize("name", ["sqlite", "libsql", "postgresql", "remote-libsql"])
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(name, tmp_path, cli):
    # scripts/chaos does this at scale (20,000 rows, 100 kills, injected faults); here a few kills per backend
    (tmp_path / "ref").mkdir()
    (tmp_path / "victim").mkdir()
    reference = make_backend("sqlite", tmp_path / "ref")
    victim = make_backend(name, tmp_path / "victim")
    for be in (reference, victim):
        build(be.engine(), memories=500, entities=100, seed=11)
    args = [*RUN_ARGS, "-b", "10", "--concurrency", "2"]
    with FakeOpenAI() as server:
        # the reference in pages of 100: the vectors do not depend on the batch size, the run's time does
        assert cli("up", *RUN_ARGS, env=env_for(server, reference.url)).code == 0
        server.configure(latency_ms=400)
        rng = random.Random(5)
        env = {**os.environ, **env_for(server, victim.url)}
        assert cli("migrate", env=env_for(server, victim.url)).code == 0
        kills = 0
        for _ in range(3 if name == "sqlite" else 2):  # a few per backend: scripts/chaos kills 100 times
            server.reset_log()
            proc = subprocess.Popen([sys.executable, "-m", "backfill", "up", *args], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.8, 2.5))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            engine = victim.engine()
            committed = {(t, i) for t in ("memories", "entities") for i, e in embeddings(engine, t).items()
                         if is_vector(e)}
            # what the killed run sent is gone; the next run must not re-send committed rows (beyond in-flight)
            check_counters(engine)
            server.reset_log()
            nxt = cli("resume", "--limit", "20", "-b", "10", "--concurrency", "2", env=env_for(server, victim.url),
                      timeout=120)
            assert nxt.code in (0, 2), nxt.output
            by_text = rows_by_text(engine)
            resent = [t for t in set(server.inputs_seen(status=None)) if by_text.get(t) and by_text[t] <= committed]
            assert not resent, f"re-sent texts of committed rows: {[sorted(by_text[t]) for t in resent][:5]}"
            engine.dispose()
        assert kills >= 2
        server.configure(latency_ms=0)  # the latency only gave the kills something in flight
        final = cli("up", *args, env=env_for(server, victim.url))
        assert final.code == 0, final.output[-4000:]
    ref_engine, victim_engine = reference.engine(), victim.engine()
    for table in ("memories", "entities"):
        assert embeddings(victim_engine, table) == embeddings(ref_engine, table)
    check_counters(victim_engine)
