"""Throughput without breaking promises: quota pacing (few 429s, nothing lost or duplicated) and
SIGKILL/resume with many requests in flight. Real CLI, real SDK, the fake server on loopback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

from backfill import tables
from conftest import ROOT, make_backend
from engine_helpers import (
    RUN_ARGS,
    assert_vectors_match_recipe,
    build,
    check_counters,
    embeddings,
    env_for,
    expected_text,
    is_vector,
    needing,
    rows_by_text,
)
from support.fake_openai import FakeOpenAI


def _texts(engine, rows: set[tuple[str, int]]) -> Counter:
    """The recipe texts the server should have seen for `rows`, as a multiset."""
    out: Counter = Counter()
    with engine.connect() as conn:
        for table, spec in tables.SPECS.items():
            cols = ", ".join(["id", *spec.text_columns])
            for row in conn.exec_driver_sql(f"SELECT {cols} FROM {table}").mappings():
                if (table, row["id"]) in rows:
                    out[expected_text(table, row)] += 1
    return out


def _job_totals(engine) -> dict:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT coalesce(sum(embedded),0), coalesce(sum(failed),0), coalesce(sum(selected),0), "
            "(SELECT count(*) FROM backfill_embeddings) FROM backfill_jobs").one()
    return dict(zip(("embedded", "failed", "selected", "provenance"), row, strict=True))


def test_a_run_over_the_token_quota_is_paced_below_one_percent_429s_and_loses_nothing(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=520, entities=80, seed=21)
    todo = needing(engine)
    expected = _texts(engine, todo)
    tpm = 60_000  # the run needs more than this: a 60k burst, then the rest paced at 1,000 tokens/s
    with FakeOpenAI(tpm=tpm, rpm=3_000, latency_ms=30) as server:
        env = env_for(server, be.url)
        result = cli("up", *RUN_ARGS, "-b", "4", "--concurrency", "6", env=env)
        assert result.code == 0, result.output[-2000:]
        stats = server.stats()
        seen_ok = Counter(server.inputs_seen(status=200))
    assert stats["tokens_embedded"] > tpm * 1.1, stats  # unpaced, this run would have hit the quota
    assert stats["by_status"].get("429", 0) < 0.01 * stats["requests"], stats
    assert set(stats["by_status"]) <= {"200", "429"}, stats
    # nothing lost: every row that needed a vector has the right one; nothing duplicated: each text
    # was embedded exactly as often as rows carry it, and sent again only after a 429
    assert needing(engine) == set()
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    assert seen_ok == expected
    assert _job_totals(engine) == {"embedded": len(todo), "failed": 0, "selected": len(todo), "provenance": len(todo)}


def test_sigkill_with_many_requests_in_flight_then_resume_equals_an_uninterrupted_run(tmp_path, cli):
    """B's kill test with 8 requests in flight and 3 pages queued ahead of the commit: after each
    kill the counters equal the rows written, a resume re-sends no committed row, and the end state
    equals an uninterrupted run's."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "victim").mkdir()
    reference = make_backend("sqlite", tmp_path / "ref")
    victim = make_backend("sqlite", tmp_path / "victim")
    for be in (reference, victim):
        build(be.engine(), memories=700, entities=150, seed=13)
    args = [*RUN_ARGS, "-b", "5", "--concurrency", "8"]
    with FakeOpenAI() as server:
        # the reference in pages of 100: the vectors do not depend on the batch size, the run's time does
        assert cli("up", *RUN_ARGS, env=env_for(server, reference.url)).code == 0
        server.configure(latency_ms=250, latency_per_input_ms=20)  # uneven: later requests often finish first
        rng = random.Random(17)
        env = {**os.environ, **env_for(server, victim.url)}
        assert cli("migrate", env=env_for(server, victim.url)).code == 0
        kills = 0
        for _ in range(5):
            proc = subprocess.Popen([sys.executable, "-m", "backfill", "up", *args], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.5, 3.0))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            engine = victim.engine()
            committed = {(t, i) for t in ("memories", "entities")
                         for i, e in embeddings(engine, t).items() if is_vector(e)}
            check_counters(engine)
            server.reset_log()
            nxt = cli("resume", "--limit", "40", *args[-4:], env=env_for(server, victim.url), timeout=120)
            assert nxt.code in (0, 2), nxt.output
            by_text = rows_by_text(engine)
            resent = [t for t in set(server.inputs_seen(status=None)) if by_text.get(t) and by_text[t] <= committed]
            assert not resent, f"re-sent texts of committed rows: {[sorted(by_text[t]) for t in resent][:5]}"
            engine.dispose()
        assert kills >= 3
        server.configure(latency_ms=0, latency_per_input_ms=0)  # the latency only gave the kills something in flight
        final = cli("up", *args, env=env_for(server, victim.url))
        assert final.code == 0, final.output[-4000:]
    ref_engine, victim_engine = reference.engine(), victim.engine()
    for table in ("memories", "entities"):
        assert embeddings(victim_engine, table) == embeddings(ref_engine, table)
    check_counters(victim_engine)


def test_bench_smoke_db_side_prints_its_table_and_summary():
    """scripts/bench is not part of the suite; this cheap run keeps it working (exit 2 = rows lost)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--only", "b", "--rows", "600"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    db = [line for line in lines if line.startswith("(b) DB side")]
    assert len(db) == 1 and float(db[0].split("rows/s")[1].split()[0].replace(",", "")) > 0, lines
    assert lines[-1].startswith("summary: ") and "targets met" in lines[-1]
